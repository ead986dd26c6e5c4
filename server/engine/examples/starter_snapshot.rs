//! Exports the newest diffusion checkpoint of a running `atelier train-base` as a
//! model folder, to try it before the run ends:
//! `cargo run -p atelier-engine --example starter_snapshot -- RUN_DIR TOKENIZER_DIR DEST`

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: starter_snapshot RUN_DIR TOKENIZER_DIR DEST");
    let step = atelier_engine::starter::train::export_snapshot(args[1].as_ref(), args[2].as_ref(), args[3].as_ref())?;
    println!("exported step {step} to {}", args[3]);
    Ok(())
}
