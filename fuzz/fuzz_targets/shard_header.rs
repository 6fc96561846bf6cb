//! Token-shard headers: any bytes give a header or an error, never a panic;
//! a header that parses describes exactly the file length it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(h) = did_engine::data::shard::Header::parse(data, len) {
        assert_eq!(48 + h.tokens * u64::from(h.bytes_per_token), len);
        assert_eq!(did_engine::data::shard::Header::parse(&h.to_bytes(), len), Ok(h));
    }
});
