//! cargo-fuzz target `http_request`: the body lives in `fuzz/harness`, shared with
//! `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/http_request/` on stable.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::http_request(data));
