//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same harness the
//! cargo-fuzz targets run (`fuzz/harness/mod.rs`), on stable Rust: CI has no nightly, so this is
//! how every input the fuzzers kept (and every crash they found) stays checked.

#[path = "../fuzz/harness/mod.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs failed: {failed:#?}", failed.len(), files.len());
}

#[test]
fn http_request_corpus() {
    replay("http_request", harness::http_request);
}

#[test]
fn publish_body_corpus() {
    replay("publish_body", harness::publish_body);
}

#[test]
fn frame_encode_corpus() {
    replay("frame_encode", harness::frame_encode);
}
