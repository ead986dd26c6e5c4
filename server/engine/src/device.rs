//! Which compute device the engine runs on: one choice (`--device`, `ATELIER_DEVICE`) for
//! every entry point, resolved against the features this build was compiled with.

use candle_core::{Device, DeviceLocation};

use crate::{Error, Result};

/// A device as the user names it: `auto`, `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA GPU 0 in a `cuda` build, else Metal GPU 0 in a `metal` build, else the CPU. A
    /// GPU build on a machine without that GPU falls back to the CPU with a warning.
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
    /// A Metal GPU by ordinal (`metal` = `metal:0`).
    Metal(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match text.split_once(':') {
            Some((kind, n)) => {
                let n = n.parse::<usize>().map_err(|_| {
                    Error::invalid("device", format!("{s:?}: the GPU number after ':' must be 0, 1, …"))
                })?;
                (kind, Some(n))
            }
            None => (text.as_str(), None),
        };
        match (kind, ordinal) {
            ("auto", None) => Ok(DeviceChoice::Auto),
            ("cpu", None) => Ok(DeviceChoice::Cpu),
            ("cuda", n) => Ok(DeviceChoice::Cuda(n.unwrap_or(0))),
            ("metal" | "mps", n) => Ok(DeviceChoice::Metal(n.unwrap_or(0))),
            _ => Err(Error::invalid("device", format!("unknown device {s:?}; use auto, cpu, cuda, cuda:N, metal or metal:N"))),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// The GPU backends compiled into this build, in the order `auto` tries them.
pub fn compiled_backends() -> &'static [&'static str] {
    match (cfg!(feature = "cuda"), cfg!(feature = "metal")) {
        (true, true) => &["cuda", "metal", "cpu"],
        (true, false) => &["cuda", "cpu"],
        (false, true) => &["metal", "cpu"],
        (false, false) => &["cpu"],
    }
}

impl DeviceChoice {
    /// Opens the device.
    ///
    /// # Errors
    /// A GPU this build was not compiled for (saying which `--features` build has it), or one
    /// the driver cannot open (no such ordinal, no driver). `auto` never fails: it falls back
    /// to the CPU and logs why.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::invalid(
                        "device",
                        format!("this build has no CUDA support; build with `cargo build --release -p server --features cuda`, or use --device {}", DeviceChoice::Auto),
                    ));
                }
                Device::new_cuda(n).map_err(|e| Error::invalid("device", format!("cannot open CUDA GPU {n}: {e}")))
            }
            DeviceChoice::Metal(n) => {
                if !cfg!(feature = "metal") {
                    return Err(Error::invalid(
                        "device",
                        "this build has no Metal support; build on a Mac with `cargo build --release -p server --features metal`, or use --device auto",
                    ));
                }
                Device::new_metal(n).map_err(|e| Error::invalid("device", format!("cannot open Metal GPU {n}: {e}")))
            }
            DeviceChoice::Auto => {
                for backend in compiled_backends() {
                    let attempt = match *backend {
                        "cuda" => DeviceChoice::Cuda(0).open(),
                        "metal" => DeviceChoice::Metal(0).open(),
                        _ => return Ok(Device::Cpu),
                    };
                    match attempt {
                        Ok(device) => return Ok(device),
                        Err(e) => tracing::warn!("--device auto: {e}; trying the next backend"),
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The device's name as shown in the studio and tagged on runs: `cpu`, `cuda:N`, `metal:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_the_rest() {
        let p = |s: &str| s.parse::<DeviceChoice>();
        assert_eq!(p("auto").unwrap(), DeviceChoice::Auto);
        assert_eq!(p(" CPU ").unwrap(), DeviceChoice::Cpu);
        assert_eq!(p("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(p("cuda:3").unwrap(), DeviceChoice::Cuda(3));
        assert_eq!(p("metal").unwrap(), DeviceChoice::Metal(0));
        assert_eq!(p("mps").unwrap(), DeviceChoice::Metal(0));
        assert_eq!(p("metal:1").unwrap(), DeviceChoice::Metal(1));
        for bad in ["gpu", "cuda:x", "cpu:0", "", "cuda:-1"] {
            let err = p(bad).unwrap_err().to_string();
            assert!(err.contains("device"), "{bad}: {err}");
        }
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2), DeviceChoice::Metal(0)] {
            assert_eq!(choice.to_string().parse::<DeviceChoice>().unwrap(), choice);
        }
    }

    #[test]
    fn auto_and_cpu_open_the_cpu_in_a_cpu_build_and_gpus_are_refused_with_the_fix() {
        if cfg!(any(feature = "cuda", feature = "metal")) {
            return; // a GPU build: auto may open a GPU
        }
        assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        assert_eq!(compiled_backends(), &["cpu"]);
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        let err = DeviceChoice::Metal(0).open().unwrap_err().to_string();
        assert!(err.contains("--features metal"), "{err}");
        assert_eq!(name(&Device::Cpu), "cpu");
    }
}
