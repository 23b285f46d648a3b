//! cargo-fuzz target `frame_encode`: the body lives in `fuzz/harness`, shared with
//! `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/frame_encode/` on stable.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::frame_encode(data));
