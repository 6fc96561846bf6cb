//! What a rank reads from the network during the rendezvous (did-engine/src/launch/rendezvous.rs):
//! a hello, and the head of rank 0's answer. Either is understood or refused; a length is never
//! trusted past its bound.
#![no_main]
use did_engine::launch::rendezvous::{parse_answer_head, parse_hello, MAX_ANSWER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((rank, world)) = parse_hello(data) {
        assert_eq!(data.len(), 13);
        let _ = (rank, world);
    }
    if let Ok(head) = <[u8; 5]>::try_from(data.get(..5).unwrap_or(&[])) {
        if let Ok((_, len)) = parse_answer_head(&head) {
            assert!(len <= MAX_ANSWER_BYTES);
        }
    }
});
