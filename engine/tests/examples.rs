//! Every definition in `examples/` is valid.

#[test]
fn every_example_definition_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            edow_engine::Definition::parse(&path.display().to_string(), &text)
                .unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 10, "{count} examples");
}
