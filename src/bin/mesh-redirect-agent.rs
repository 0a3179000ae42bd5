//! The node agent (the DaemonSet's process); see `mesh_redirect::agent`.

fn main() -> std::process::ExitCode {
    mesh_redirect::agent::main(std::env::args().skip(1).collect())
}
