//! rust-peer: the Rust side of the ttrpc interop tests, the twin of the Go
//! peer in tests/interop/go/cmd/peer. It uses containerd's ttrpc-rust (async)
//! with code generated at build time from ttrpc-asyncio/tests/echo/echo.proto.
//!
//!     rust-peer server --listen unix:/abs/path.sock
//!     rust-peer client --dial unix:/abs/path.sock --case NAME|all
//!
//! server: serves socketforward.interop.v1.Echo with the Go peer's echoServer
//! semantics, prints one line READY on stdout once listening, and exits 0 on
//! SIGTERM or SIGINT. Logs go to stderr.
//!
//! client: runs the named case (or all) against an Echo server, each on a
//! fresh connection and bounded by 30 s; prints `PASS <name>` on stdout for
//! each passing case and `FAIL <name>: <why>` on stderr (as the Go peer does)
//! for each failing one, and exits 1 if any failed. The cases are the Go
//! peer's, less max_frame and oversize (raw frame sizes).
//!
//! Only `unix:/absolute/path` addresses are accepted.
//!
//! Build: cargo build --locked --target-dir DIR (from this directory; the tests
//! build it into build/interop/rust-target, see tests/interop/peers.py).

mod client;
mod server;

#[allow(clippy::all)]
mod gen {
    include!(concat!(env!("OUT_DIR"), "/mod.rs"));
}

use std::process::ExitCode;

/// The Echo service's full protobuf name.
pub const ECHO_SERVICE: &str = "socketforward.interop.v1.Echo";

fn usage() -> ExitCode {
    eprintln!(
        "usage: rust-peer server --listen unix:/abs/path.sock\n       \
         rust-peer client --dial unix:/abs/path.sock --case NAME|all"
    );
    ExitCode::from(2)
}

/// Parses `--name value`, `--name=value` (one dash works too) into pairs,
/// accepting only the given flag names.
fn parse_flags(args: &[String], known: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("flag --{flag} needs a value"))?;
                (flag.to_string(), v.clone())
            }
        };
        if !known.contains(&name.as_str()) {
            return Err(format!("unknown flag --{name}"));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn flag<'a>(flags: &'a [(String, String)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Parses "unix:/abs/path" and refuses anything else.
pub fn unix_path(addr: &str) -> Result<String, String> {
    match addr.strip_prefix("unix:") {
        Some(p) if p.starts_with('/') => Ok(p.to_string()),
        _ => Err(format!("address {addr:?}: want unix:/absolute/path")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        return usage();
    }
    let (known, rest): (&[&str], _) = match args[1].as_str() {
        "server" => (&["listen"], &args[2..]),
        "client" => (&["dial", "case"], &args[2..]),
        _ => return usage(),
    };
    let flags = match parse_flags(rest, known) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("rust-peer: {e}");
            return usage();
        }
    };

    // A single-threaded runtime: ttrpc-rust hands each incoming frame to its
    // own spawned task, and one thread runs those in arrival order, so the
    // messages of a stream are seen in the order they were sent.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rust-peer: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };

    let result = match args[1].as_str() {
        "server" => unix_path(flag(&flags, "listen").unwrap_or(""))
            .and_then(|path| rt.block_on(server::run(&path))),
        _ => unix_path(flag(&flags, "dial").unwrap_or("")).and_then(|path| {
            rt.block_on(client::run(&path, flag(&flags, "case").unwrap_or("all")))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rust-peer: {e}");
            ExitCode::FAILURE
        }
    }
}
