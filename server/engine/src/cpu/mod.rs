//! CPU kernels that Candle lacks or runs slowly: blocked multi-head attention
//! ([`attention`]), convolutions as shifted GEMMs without im2col ([`conv`]), GroupNorm
//! fused with SiLU ([`norm`]), a vectorised `exp` and in-place softmax ([`exp`]), the
//! GEGLU gate and exact GELU ([`geglu`]), and bias/residual additions written over a
//! layer's fresh output ([`add`]).
//!
//! Each kernel is plain Rust that the compiler vectorises, compiled for the baseline
//! target and again for AVX2+FMA and AVX-512, and the widest the CPU has is chosen at
//! run time: one binary runs on every x86-64 CPU and uses what it finds. Other
//! architectures (Apple silicon, where NEON is baseline) use the baseline build.

pub mod add;
pub mod attention;
pub mod conv;
pub mod exp;
pub mod geglu;
pub mod norm;

use candle_core::{CpuStorage, Layout, Result};

/// The f32 data of a contiguous CPU tensor, as a slice.
///
/// # Errors
/// Another dtype, or a strided layout; `op` names the kernel in the message.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{op}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The f32 data of a contiguous CPU tensor, writable: the output of an in-place kernel.
///
/// # Errors
/// Another dtype, or a strided layout; `op` names the kernel in the message.
pub(crate) fn contiguous_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (a, b) = match layout.contiguous_offsets() {
        Some(o) => o,
        None => candle_core::bail!("{op}: the output must be contiguous"),
    };
    match storage {
        CpuStorage::F32(d) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    }
}

/// The widest vector instruction set this CPU offers that the kernels are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// The build target's baseline (SSE2 on x86-64, NEON on aarch64).
    Baseline,
    /// 256-bit AVX2 with fused multiply-add.
    Avx2,
    /// 512-bit AVX-512F.
    Avx512,
}

/// What [`exp`] and [`attention`] use on this CPU (detected once).
pub fn simd() -> Simd {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    })
}

/// Defines `$name`, calling the `#[inline(always)]` function `$generic` compiled for the
/// widest instruction set [`simd`] found.
macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $generic:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) -> $ret { $generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid($($arg: $ty),*) -> $ret { $generic($($arg),*) }
                match $crate::cpu::simd() {
                    // SAFETY: `simd()` detected the features these copies were compiled for.
                    $crate::cpu::Simd::Avx512 => return unsafe { wide($($arg),*) },
                    $crate::cpu::Simd::Avx2 => return unsafe { mid($($arg),*) },
                    $crate::cpu::Simd::Baseline => {}
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use dispatch;
