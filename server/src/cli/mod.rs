//! The command-line subcommands other than `serve`.

pub mod bench;
pub mod blend;
pub mod eval_negatives;
pub mod eval_starter;
pub mod eval_styles;
pub mod generate;
pub mod optimize_negative;
pub mod reference;
pub mod runs;
pub mod style_data;
pub mod train_base;
pub mod train_style;

/// The compute device: the first CUDA / Metal GPU in builds with those features, else the CPU.
pub fn device() -> anyhow::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(candle_core::Device::new_cuda(0)?);
    }
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    {
        return Ok(candle_core::Device::new_metal(0)?);
    }
    #[allow(unreachable_code)]
    Ok(candle_core::Device::Cpu)
}

/// `--max-memory`: a size such as `12GiB`, `512MiB` or a byte count.
pub fn parse_budget(text: &str) -> Result<atelier_engine::memory::MemoryBudget, String> {
    atelier_engine::memory::parse_size(text)
        .map(|limit| atelier_engine::memory::MemoryBudget { limit })
        .ok_or_else(|| format!("{text:?} is not a size; write it like 12GiB, 512MiB or 8G"))
}

/// `--alpha-background`: `white`, `black`, `grey` or `#RRGGBB`.
pub fn parse_background(text: &str) -> Result<[u8; 3], String> {
    atelier_engine::image_input::parse_colour(text).ok_or_else(|| format!("{text:?} is not a colour; write white, black, grey or #RRGGBB"))
}
