//! The command-line subcommands other than `serve`.

pub mod bench;
pub mod blend;
pub mod eval_negatives;
pub mod eval_starter;
pub mod eval_styles;
pub mod generate;
pub mod optimize_negative;
pub mod reference;
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
