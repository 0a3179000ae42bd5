//! One binary, two faces: a CNI plugin when `CNI_COMMAND` is set, a CLI otherwise.

use mesh_redirect::{cli, plugin, protocol};
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        cni_main()
    } else {
        cli::main(std::env::args().skip(1).collect())
    }
}

fn cni_main() -> ExitCode {
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
    if out.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
