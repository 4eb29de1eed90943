//! The orchestrator binary: drives workflows from triggers, signals and task results (vertical slice issue).

fn main() {
    eprintln!("orchestrator: not built yet; see the vertical-slice issue");
    std::process::exit(2);
}
