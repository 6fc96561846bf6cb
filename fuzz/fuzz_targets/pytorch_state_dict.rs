//! The `pytorch_model.bin` reader on arbitrary bytes: a zip archive as is
//! (input starting with `PK`), otherwise the bytes as the archive's `data.pkl`
//! beside one 64-byte storage, so that the pickle machine itself is explored.
//! Tensors or a clear error, never a panic, never an allocation past the input.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;

fn wrap(pickle: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut w = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pickle).unwrap();
    w.start_file("archive/data/0", opts).unwrap();
    w.write_all(&[0x3f; 64]).unwrap();
    w.finish().unwrap();
    buf.into_inner()
}

fuzz_target!(|data: &[u8]| {
    let file = if data.starts_with(b"PK") { data.to_vec() } else { wrap(data) };
    if let Ok(tensors) = did_engine::import::torch_pickle::read(&file) {
        for (_, t) in tensors {
            assert_eq!(t.values.len(), t.shape.iter().product::<usize>());
        }
    }
});
