//! The streaming corpus reader on arbitrary bytes, under each name it dispatches
//! on (the first byte picks it): tar, .tar.gz, .tar.xz, .xz and .gz (a tar inside
//! or not, OpenWebText's nesting included), JSON lines. Documents or a clear
//! error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 7] = [
    "fuzz.tar",
    "fuzz.tgz",
    "fuzz.tar.xz",
    "fuzz_data.xz",
    "fuzz.jsonl.gz",
    "fuzz.txt.xz",
    "fuzz.jsonl",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let name = NAMES[usize::from(pick) % NAMES.len()];
    let _ = did_engine::data::documents::read_stream(name, rest, "text", &mut |d| {
        assert!(d.name.starts_with(name));
        assert!(!d.text.contains('\r'), "line ends are normalised to LF");
        Ok(())
    });
});
