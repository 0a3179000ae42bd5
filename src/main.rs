//! One binary, two faces: a CNI plugin when `CNI_COMMAND` is set, a CLI otherwise.
//!
//! The C runtime calls our `main` directly (`no_main`): the runtime execs the plugin for every
//! ADD and DEL, and Rust's own start-up before `main` (reading `/proc/self/maps` to find the
//! main thread's stack guard, a signal stack for overflow reports, `SIGPIPE` ignored, checks
//! of fds 0-2) costs about 0.1 ms per exec here and buys a one-shot process nothing
//! (docs/PERFORMANCE.md). Arguments and the environment need no start-up (glibc hands them to
//! std). `SIGPIPE` keeps its default, as for C tools: a reader that went away ends the
//! process; the event socket is written with `MSG_NOSIGNAL`.
// Under `cargo test` the test harness brings its own `main`.
#![cfg_attr(not(test), no_main)]
#![deny(unsafe_code)]

use mesh_redirect::{cli, plugin, protocol};
use std::ffi::{c_char, c_int};
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

// SAFETY: the program's only `main` symbol (Rust generates none under `no_main`), with the
// signature the C runtime calls; neither argument is read. This exported name is the one
// `unsafe` item outside the FFI module.
#[allow(unsafe_code)]
#[cfg_attr(not(test), unsafe(no_mangle))]
#[cfg_attr(test, allow(dead_code))]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    let status = if std::env::var_os("CNI_COMMAND").is_some() {
        cni_main()
    } else {
        cli::main(std::env::args().skip(1).collect())
    };
    // What std's `main` wrapper does too: stdout's buffer is flushed at exit.
    let _ = std::io::stdout().flush();
    c_int::from(status)
}

fn cni_main() -> u8 {
    // The runtime reads our stdout as JSON: a panic must become an error JSON, not a trace.
    std::panic::set_hook(Box::new(|_| {}));
    let out = catch_unwind(AssertUnwindSafe(|| {
        let mut stdin = Vec::new();
        // Bounded: one byte past the limit is enough to report "too large".
        let read = std::io::stdin()
            .lock()
            .take(protocol::MAX_STDIN as u64 + 1)
            .read_to_end(&mut stdin);
        match read {
            // Lossy: a non-UTF-8 value then fails where it is used, naming it, instead of reading
            // as "missing".
            Ok(_) => plugin::run(
                |k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()),
                &stdin,
            ),
            Err(e) => plugin::Output {
                stdout: Some(
                    protocol::CniError::new(
                        protocol::code::IO_FAILURE,
                        format!("cannot read stdin: {e}"),
                    )
                    .to_json(protocol::LATEST),
                ),
                ok: false,
            },
        }
    }));
    let out = out.unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        plugin::Output {
            stdout: Some(
                protocol::CniError::new(
                    protocol::code::INTERNAL,
                    format!("internal error (a bug, please report): {what}"),
                )
                .to_json(protocol::LATEST),
            ),
            ok: false,
        }
    });
    if let Some(v) = out.stdout {
        let mut s = std::io::stdout().lock();
        let _ = writeln!(s, "{v}");
        let _ = s.flush();
    }
    if out.ok { 0 } else { 1 }
}
