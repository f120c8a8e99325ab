//! Quick engine speed probe: `cargo run -p cohort-trainer --example speed -- MODEL.gguf`.
#![allow(clippy::print_stdout, clippy::unwrap_used)]
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let file = cohort_trainer::gguf::GgufFile::open(&path).unwrap();
    let engine = cohort_trainer::engine::Engine::from_gguf(&file).unwrap();
    let prompt: Vec<u32> = (0..128).map(|i| 100 + (i * 37) % 5000).collect();
    let r = cohort_trainer::bench::inference(&engine, &prompt, 128, 64, 2).unwrap();
    println!("{r:?}");
}
