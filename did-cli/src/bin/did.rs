fn main() -> std::process::ExitCode {
    did_cli::run(&std::env::args().skip(1).collect::<Vec<_>>())
}
