//! cargo-fuzz target `publish_body`: the body lives in `fuzz/harness`, shared with
//! `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/publish_body/` on stable.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::publish_body(data));
