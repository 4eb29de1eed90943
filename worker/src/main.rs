//! The worker binary: runs tasks from its task topics and publishes results (vertical slice issue).

fn main() {
    eprintln!("worker: not built yet; see the vertical-slice issue");
    std::process::exit(2);
}
