//! ringcast-loadtest: a wrk-style Server-Sent Events load generator.

mod cli;
mod net;
mod procstat;
mod publisher;
mod replay;
mod report;
mod run;
mod shard;
mod sse;
mod stats;
mod subscriber;

use std::process::ExitCode;

use clap::Parser;

use cli::{parse_child_range, Args, Target};

fn main() -> ExitCode {
    let raw_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let args = Args::parse();
    let result = match &args.child_range {
        Some(range) => run_child(&args, range),
        None if args.replay.is_some() => {
            replay::run(&args, &raw_args).map(|report| print_report(&report, args.json, || report.to_text()))
        }
        None => run::run(&args, &raw_args).map(|report| print_report(&report, args.json, || report.to_text())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast-loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a report on stdout: one JSON object with `--json`, else its text.
fn print_report(report: &impl serde::Serialize, json: bool, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string(report).expect("report is serializable"));
    } else {
        print!("{}", text());
    }
}

/// A child process: holds its range of subscribers and talks to the parent.
fn run_child(args: &Args, range: &str) -> Result<(), String> {
    let (start, count) = parse_child_range(range)?;
    let target = Target::parse(&args.target)?;
    let (processes, threads) = run::layout(args);
    let threads = args.child_threads.unwrap_or(threads);
    let cfg = run::sub_config(args, &target, processes, threads);
    shard::child_main(cfg, start..start + count, threads).map_err(|e| e.to_string())
}
