//! `did data prepare` on a .tar.gz archive of arbitrary bytes: documents or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut docs = Vec::new();
    if did_engine::data::documents::read_archive_from("fuzz.tgz", data, &mut docs).is_ok() {
        for d in &docs {
            assert!(d.name.starts_with("fuzz.tgz:"));
            assert!(!d.text.contains('\r'), "line ends are normalised to LF");
        }
    }
});
