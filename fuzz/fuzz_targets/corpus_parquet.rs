//! The Parquet corpus reader on arbitrary bytes (the `text` column, one document
//! per row): documents or a clear error, never a panic. The parquet crate's own
//! assertions on corrupt files are fenced by the reader (`catch_unwind`); the
//! hook that libfuzzer-sys installs would abort on them before the fence, so it
//! is replaced by a silent one. A panic anywhere else still reaches the
//! harness, which aborts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let mut docs = 0usize;
    let _ = did_engine::data::documents::parquet_documents(
        "fuzz.parquet",
        bytes::Bytes::from(data.to_vec()),
        "text",
        &mut |d| {
            assert!(!d.text.contains('\r'), "line ends are normalised to LF");
            docs += 1;
            Ok(())
        },
    );
});
