//! `atelier export ios-app`: writes a SwiftUI app (an Xcode / Swift Playgrounds app package)
//! around the Core ML models `atelier export coreml` wrote. The app depends on a released
//! version of Apple's ml-stable-diffusion Swift package, bundles the export folder or imports
//! it through the Files app, compiles each `.mlpackage` to `.mlmodelc` on first launch, and
//! has Generate and Benchmark screens. The Swift sources are templates under
//! `server/templates/ios-app/`, filled by plain `{{NAME}}` substitution.
//!
//! Also here: [`ExportManifest`], the reader of `atelier_export.json` that `atelier bench
//! --case coreml-e2e` uses too.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The released ml-stable-diffusion tag the generated Package.swift pins (`exact:`).
pub const ML_STABLE_DIFFUSION_VERSION: &str = "1.1.1";

/// The `format` value of atelier_export.json.
pub const EXPORT_FORMAT: &str = "atelier-coreml-export";

/// The manifest's file name in an export folder.
pub const MANIFEST_FILE: &str = "atelier_export.json";

/// The tokenizer files `StableDiffusionPipeline(resourcesAt:)` reads beside the models.
pub const TOKENIZER_FILES: [&str; 2] = ["vocab.json", "merges.txt"];

/// Arguments of `atelier export ios-app`.
#[derive(Debug, clap::Args)]
pub struct IosAppArgs {
    /// The export folder `atelier export coreml` wrote (with atelier_export.json).
    #[arg(long, value_name = "DIR")]
    pub models: PathBuf,
    /// The app folder to write (must not exist, or be empty).
    #[arg(long, value_name = "APPDIR")]
    pub out: PathBuf,
    /// The app's display name (letters, digits, spaces, `-` and `_`; starts with a letter).
    #[arg(long, default_value = "Atelier Styles")]
    pub name: String,
    /// Bundle identifier in reverse-DNS form (default: com.example.<name in lower case>).
    #[arg(long)]
    pub bundle_id: Option<String>,
    /// Copy the export into the app's resources (App/Resources/Models); the default.
    #[arg(long, conflicts_with = "import")]
    pub embed: bool,
    /// Leave the models out: the app asks for the export folder through the Files app.
    #[arg(long)]
    pub import: bool,
}

/// `atelier_export.json` (format "atelier-coreml-export", version 1, checked by
/// [`ExportManifest::read`]), as far as the app template and the coreml-e2e benchmark need
/// it; other fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportManifest {
    pub version: u32,
    #[serde(default)]
    pub atelier_version: Option<String>,
    pub base_model: BaseModel,
    pub styles: Vec<ExportStyle>,
    #[serde(default)]
    pub default_style: Option<String>,
    pub settings: ExportSettings,
    pub packages: Vec<ExportPackage>,
}

/// The model the export was made from: its folder name or hub id, and the short hash of its
/// UNet weights (first 10 hex digits of SHA-256, as blends record it).
#[derive(Debug, Clone, Deserialize)]
pub struct BaseModel {
    pub name: String,
    #[serde(default)]
    pub hash: Option<String>,
}

/// A style baked into the export.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportStyle {
    pub name: String,
    /// The package function holding this style (multifunction exports).
    #[serde(default)]
    pub function: Option<String>,
    /// "base", "lora" or "blend".
    #[serde(default)]
    pub kind: Option<String>,
    /// Share link of the blend.
    #[serde(default)]
    pub link: Option<String>,
    #[serde(default)]
    pub components: Vec<StyleComponent>,
}

/// A LoRA merged into a style, with its short hash and weight.
#[derive(Debug, Clone, Deserialize)]
pub struct StyleComponent {
    pub name: String,
    #[serde(default)]
    pub hash: Option<String>,
    #[serde(default)]
    pub weight: Option<f64>,
}

/// Export settings; sizes in pixels.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportSettings {
    #[serde(default)]
    pub target: Option<String>,
    pub width: usize,
    pub height: usize,
    #[serde(default)]
    pub multifunction: bool,
}

/// One package in the export folder; `bytes` is its size on disk.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportPackage {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub functions: Vec<String>,
}

impl ExportManifest {
    /// Reads `DIR/atelier_export.json`.
    ///
    /// # Errors
    /// The file is missing or unreadable, is not JSON of this shape, names another format,
    /// or comes from a newer manifest version.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).with_context(|| {
            format!("{} has no readable {MANIFEST_FILE}: pass the folder `atelier export coreml --out DIR` wrote", dir.display())
        })?;
        let probe: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let format = probe.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != EXPORT_FORMAT {
            bail!(
                "{} is not an Atelier Core ML export: its \"format\" is {format:?}, expected {EXPORT_FORMAT:?}",
                path.display()
            );
        }
        let manifest: Self =
            serde_json::from_value(probe).with_context(|| format!("{} is not a well-formed {EXPORT_FORMAT} manifest", path.display()))?;
        if manifest.version != 1 {
            bail!("{} is manifest version {}; this Atelier reads version 1", path.display(), manifest.version);
        }
        Ok(manifest)
    }

    /// Sum of the packages' sizes in bytes.
    pub fn package_bytes(&self) -> u64 {
        self.packages.iter().map(|p| p.bytes).sum()
    }

    /// The default style: `default_style`, else the first style.
    pub fn default_style(&self) -> Option<&ExportStyle> {
        match &self.default_style {
            Some(name) => self.styles.iter().find(|s| &s.name == name),
            None => self.styles.first(),
        }
    }

    /// Whether the UNet is split into `UnetChunk1` + `UnetChunk2`.
    pub fn chunked(&self) -> bool {
        self.has("UnetChunk1") && self.has("UnetChunk2")
    }

    fn has(&self, name: &str) -> bool {
        self.packages.iter().any(|p| p.name == name)
    }

    /// The compiled model folders `StableDiffusionPipeline(resourcesAt:)` loads for this
    /// export, in the pipeline's names: TextEncoder, Unet or UnetChunk1 + UnetChunk2,
    /// VAEDecoder, and VAEEncoder when exported.
    pub fn compiled_models(&self) -> Vec<String> {
        self.packages.iter().map(|p| format!("{}.mlmodelc", p.name)).collect()
    }

    /// Checks that the export is one the Swift pipeline can load and that its files are in
    /// `dir`.
    ///
    /// # Errors
    /// A required package (TextEncoder, VAEDecoder, Unet or both chunks) missing from the
    /// manifest, an unknown package name, a path outside the folder, a listed file that is
    /// not there, a default style that is not among the styles, a multifunction package
    /// without a style's function, or a size that is not a positive multiple of 8.
    pub fn check(&self, dir: &Path) -> Result<()> {
        const KNOWN: [&str; 6] = ["TextEncoder", "Unet", "UnetChunk1", "UnetChunk2", "VAEDecoder", "VAEEncoder"];
        let mut missing: Vec<&str> = ["TextEncoder", "VAEDecoder"].into_iter().filter(|n| !self.has(n)).collect();
        if !self.chunked() && !self.has("Unet") {
            missing.push("Unet (or UnetChunk1 + UnetChunk2)");
        }
        if !missing.is_empty() {
            bail!("{} lists no {} package; the Swift pipeline needs it", dir.join(MANIFEST_FILE).display(), missing.join(", "));
        }
        for p in &self.packages {
            if !KNOWN.contains(&p.name.as_str()) {
                bail!("package {:?} is not one the Swift pipeline loads (known: {})", p.name, KNOWN.join(", "));
            }
            let plain = !p.path.is_empty() && !p.path.contains(['/', '\\']) && !p.path.starts_with('.');
            let ext_ok = p.path.ends_with(".mlpackage") || p.path.ends_with(".mlmodelc");
            if !plain || !ext_ok {
                bail!("package {} has path {:?}: expected a .mlpackage (or .mlmodelc) directly in the export folder", p.name, p.path);
            }
            if !dir.join(&p.path).exists() {
                bail!("{} is listed in {MANIFEST_FILE} but missing from {}", p.path, dir.display());
            }
        }
        for f in TOKENIZER_FILES {
            if !dir.join(f).is_file() {
                bail!("{} has no {f}; the Swift pipeline's tokenizer reads it", dir.display());
            }
        }
        if self.styles.is_empty() {
            bail!("{} lists no styles", dir.join(MANIFEST_FILE).display());
        }
        if let Some(d) = &self.default_style {
            if !self.styles.iter().any(|s| &s.name == d) {
                bail!("default_style {d:?} is not among the export's styles");
            }
        }
        if self.settings.multifunction {
            for p in &self.packages {
                for s in &self.styles {
                    let function = s.function.as_deref().unwrap_or(&s.name);
                    if !p.functions.iter().any(|f| f == function) {
                        bail!("multifunction export: package {} has no function {function:?} for style {:?}", p.name, s.name);
                    }
                }
            }
        }
        let (w, h) = (self.settings.width, self.settings.height);
        if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 {
            bail!("settings.width/height {w}×{h} are not positive multiples of 8");
        }
        Ok(())
    }
}

/// One template file: its path in the app and its text.
const TEMPLATES: [(&str, &str); 8] = [
    ("Package.swift", include_str!("../../templates/ios-app/Package.swift")),
    ("README.md", include_str!("../../templates/ios-app/README.md")),
    ("App/AtelierApp.swift", include_str!("../../templates/ios-app/App/AtelierApp.swift")),
    ("App/ContentView.swift", include_str!("../../templates/ios-app/App/ContentView.swift")),
    ("App/BenchmarkView.swift", include_str!("../../templates/ios-app/App/BenchmarkView.swift")),
    ("App/ModelStore.swift", include_str!("../../templates/ios-app/App/ModelStore.swift")),
    ("App/ExportManifest.swift", include_str!("../../templates/ios-app/App/ExportManifest.swift")),
    ("App/GeneratedExport.swift", include_str!("../../templates/ios-app/App/GeneratedExport.swift")),
];

/// The benchmark workload both sides run (the app's Benchmark screen and `atelier bench
/// --case coreml-e2e`).
pub mod workload {
    /// Prompt of every timed image.
    pub const PROMPT: &str = "a red circle on a blue background";
    /// Seed of every timed image.
    pub const SEED: u32 = 42;
    /// Classifier-free guidance scale.
    pub const GUIDANCE: f64 = 7.5;
    /// Denoising steps when not given.
    pub const STEPS: usize = 20;
}

/// A Swift string literal holding `text` (quotes included), escaped as The Swift
/// Programming Language's "String Literals" section lists.
pub fn swift_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn swift_optional_string(text: Option<&str>) -> String {
    text.map_or_else(|| "nil".to_string(), swift_string)
}

/// Replaces every `{{KEY}}` in `template` in one pass (values are not scanned again).
///
/// # Errors
/// A placeholder with no value (a template and this code out of step).
fn fill(file: &str, template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after.find("}}").with_context(|| format!("template {file} has an unclosed {{{{"))?;
        let key = &after[..end];
        let value = values.iter().find(|(k, _)| *k == key).with_context(|| format!("template {file} has a placeholder {{{{{key}}}}} with no value"))?;
        out.push_str(&value.1);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks the display name; returns the Swift type name of the app (`AtelierStylesApp`).
fn app_type_name(name: &str) -> Result<String> {
    let ok = !name.trim().is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_'));
    if !ok {
        bail!("--name {name:?}: use 1 to 64 letters, digits, spaces, '-' or '_', starting with a letter");
    }
    let mut ty = String::new();
    for word in name.split([' ', '-', '_']).filter(|w| !w.is_empty()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            ty.push(first.to_ascii_uppercase());
            ty.extend(chars);
        }
    }
    if !ty.ends_with("App") {
        ty.push_str("App");
    }
    Ok(ty)
}

/// Checks a reverse-DNS bundle identifier (Apple's CFBundleIdentifier: letters, digits, `-`
/// and `.`), or makes one from the name.
fn bundle_id(given: Option<&str>, name: &str) -> Result<String> {
    let id = match given {
        Some(id) => id.to_string(),
        None => format!("com.example.{}", name.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase()),
    };
    let parts: Vec<&str> = id.split('.').collect();
    let ok = parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !ok {
        bail!("--bundle-id {id:?}: write it in reverse-DNS form, e.g. com.example.myapp (letters, digits, '-', dots between)");
    }
    Ok(id)
}

/// The minimum iOS version for the export's target (the pipeline itself needs 16.2;
/// multifunction packages need 18).
fn ios_min(manifest: &ExportManifest) -> Result<&'static str> {
    let target = manifest.settings.target.as_deref().unwrap_or("ios17");
    let min = match target {
        "ios16" => "16.2",
        "ios17" => "17.0",
        "ios18" => "18.0",
        other => bail!("settings.target {other:?} is not one of ios16, ios17, ios18"),
    };
    Ok(if manifest.settings.multifunction { "18.0" } else { min })
}

fn swift_list(items: &[String]) -> String {
    items.iter().map(|s| swift_string(s)).collect::<Vec<_>>().join(", ")
}

fn swift_style(s: &ExportStyle) -> String {
    let components: Vec<String> = s
        .components
        .iter()
        .map(|c| {
            format!(
                "ExportComponent(name: {}, hash: {}, weight: {})",
                swift_string(&c.name),
                swift_optional_string(c.hash.as_deref()),
                c.weight.map_or_else(|| "nil".to_string(), |w| format!("{w:?}"))
            )
        })
        .collect();
    format!(
        "        ExportStyle(name: {}, function: {}, kind: {}, link: {}, components: [{}]),",
        swift_string(&s.name),
        swift_optional_string(s.function.as_deref()),
        swift_optional_string(s.kind.as_deref()),
        swift_optional_string(s.link.as_deref()),
        components.join(", ")
    )
}

/// The generated app's files (path in the app → text) for `manifest`.
///
/// # Errors
/// A bad name or bundle id, an unknown target, or a template out of step with this code.
pub fn render(manifest: &ExportManifest, name: &str, bundle: Option<&str>, embed: bool) -> Result<Vec<(String, String)>> {
    let app_type = app_type_name(name)?;
    let bundle = bundle_id(bundle, name)?;
    let ios = ios_min(manifest)?;
    let version = env!("CARGO_PKG_VERSION");
    let packages: Vec<String> = manifest.packages.iter().map(|p| p.path.clone()).collect();
    let compiled = manifest.compiled_models();
    let styles: Vec<String> = manifest.styles.iter().map(swift_style).collect();
    let style_list = manifest.styles.iter().map(|s| format!("`{}`", s.name)).collect::<Vec<_>>().join(", ");
    let default_style = manifest.default_style().map(|s| s.name.clone()).unwrap_or_default();
    let models_section = if embed {
        format!(
            "The export is bundled in the app: `App/Resources/Models` holds {} with `vocab.json`, `merges.txt` and `atelier_export.json` (copied from the export folder by `atelier export ios-app --embed`).",
            packages.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
        )
    } else {
        format!(
            "The models are not in the app (`--import`): copy the export folder (with {}, `vocab.json`, `merges.txt` and `atelier_export.json`) to the device through iCloud Drive, AirDrop or the Finder, then tap **Import models…** and pick it.",
            packages.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
        )
    };
    let values: Vec<(&str, String)> = vec![
        ("APP_NAME", name.to_string()),
        ("APP_NAME_LITERAL", swift_string(name)),
        ("APP_TYPE", app_type),
        ("BUNDLE_ID", bundle),
        ("IOS_MIN", ios.to_string()),
        ("SD_VERSION", ML_STABLE_DIFFUSION_VERSION.to_string()),
        ("ATELIER_VERSION", version.to_string()),
        (
            "RESOURCES",
            if embed { ",\n            resources: [\n                .copy(\"Resources/Models\")\n            ]".to_string() } else { String::new() },
        ),
        ("EXPORT_JSON_NAME", MANIFEST_FILE.to_string()),
        ("MODEL_SOURCE", if embed { "bundled" } else { "imported" }.to_string()),
        (
            "BUNDLED_MODELS_URL",
            if embed {
                "Bundle.module.url(forResource: \"Models\", withExtension: nil) ?? Bundle.main.url(forResource: \"Models\", withExtension: nil)"
            } else {
                "nil"
            }
            .to_string(),
        ),
        ("BASE_MODEL", manifest.base_model.name.clone()),
        ("BASE_MODEL_LITERAL", swift_string(&manifest.base_model.name)),
        ("BASE_MODEL_HASH_LITERAL", swift_string(manifest.base_model.hash.as_deref().unwrap_or(""))),
        ("EXPORT_VERSION_LITERAL", swift_string(manifest.atelier_version.as_deref().unwrap_or(version))),
        ("STYLES", styles.join("\n")),
        ("STYLE_LIST", style_list),
        ("DEFAULT_STYLE_LITERAL", swift_string(&default_style)),
        ("MULTIFUNCTION", manifest.settings.multifunction.to_string()),
        ("WIDTH", manifest.settings.width.to_string()),
        ("HEIGHT", manifest.settings.height.to_string()),
        ("PACKAGES", swift_list(&packages)),
        ("PACKAGE_BYTES", manifest.package_bytes().to_string()),
        ("COMPILED_MODELS", swift_list(&compiled)),
        ("COMPILED_LIST", compiled.iter().map(|c| format!("- `{c}`")).collect::<Vec<_>>().join("\n")),
        ("MODELS_SECTION", models_section),
        ("TARGET", manifest.settings.target.clone().unwrap_or_else(|| "ios17".into())),
        (
            "MULTIFUNCTION_NOTE",
            if manifest.settings.multifunction { "; the packages hold one function per style, which needs iOS 18" } else { "" }.to_string(),
        ),
        (
            "MULTIFUNCTION_PICKER_NOTE",
            if manifest.settings.multifunction {
                "; each style is a function of the same packages, chosen with `MLModelConfiguration.functionName`"
            } else {
                "; one style is baked into these packages"
            }
            .to_string(),
        ),
        ("BENCH_PROMPT", workload::PROMPT.to_string()),
        ("BENCH_PROMPT_LITERAL", swift_string(workload::PROMPT)),
        ("BENCH_SEED", workload::SEED.to_string()),
        ("BENCH_GUIDANCE", format!("{:?}", workload::GUIDANCE)),
    ];
    TEMPLATES.iter().map(|(path, text)| Ok((path.to_string(), fill(path, text, &values)?))).collect()
}

/// Copies `src` (a file or folder) to `dest`, hard-linking files where the file system
/// allows it (exported weights are large and never edited in place).
fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    if src.is_file() {
        if std::fs::hard_link(src, dest).is_err() {
            std::fs::copy(src, dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
        }
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(src) {
        let entry = entry.with_context(|| format!("reading {}", src.display()))?;
        let rel = entry.path().strip_prefix(src).expect("walkdir yields paths under its root");
        let to = dest.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        } else if std::fs::hard_link(entry.path(), &to).is_err() {
            std::fs::copy(entry.path(), &to).with_context(|| format!("copying {} to {}", entry.path().display(), to.display()))?;
        }
    }
    Ok(())
}

fn write_app(args: &IosAppArgs, manifest: &ExportManifest, files: &[(String, String)], partial: &Path) -> Result<()> {
    for (path, text) in files {
        let to = partial.join(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&to, text).with_context(|| format!("writing {}", to.display()))?;
    }
    if !args.import {
        let models = partial.join("App/Resources/Models");
        std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
        let names = manifest.packages.iter().map(|p| p.path.as_str()).chain(TOKENIZER_FILES).chain([MANIFEST_FILE]);
        for name in names {
            copy_tree(&args.models.join(name), &models.join(name))?;
        }
    }
    Ok(())
}

/// Writes the app: everything is built in `APPDIR.partial` and renamed into place, so a
/// failure leaves no half-written app.
pub fn run(args: IosAppArgs) -> Result<()> {
    let manifest = ExportManifest::read(&args.models)?;
    manifest.check(&args.models)?;
    if args.out.exists() {
        let empty = std::fs::read_dir(&args.out)
            .with_context(|| format!("{} exists and is not a readable folder", args.out.display()))?
            .next()
            .is_none();
        if !empty {
            bail!("{} exists and is not empty; choose a new folder (nothing was written)", args.out.display());
        }
    }
    let files = render(&manifest, &args.name, args.bundle_id.as_deref(), !args.import)?;
    let file_name = args.out.file_name().context("--out needs a folder name")?.to_string_lossy().into_owned();
    let partial = args.out.with_file_name(format!("{file_name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing the leftover {}", partial.display()))?;
    }
    let written = write_app(&args, &manifest, &files, &partial).and_then(|()| {
        if args.out.exists() {
            std::fs::remove_dir(&args.out).with_context(|| format!("replacing the empty {}", args.out.display()))?;
        }
        std::fs::rename(&partial, &args.out).with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    println!(
        "wrote {} ({} styles, models {}); open it in Xcode on a Mac (see its README.md)",
        args.out.display(),
        manifest.styles.len(),
        if args.import { "imported through the Files app" } else { "bundled" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swift_literals_escape_what_swift_needs() {
        assert_eq!(swift_string("a \"b\" \\ c\n\t\u{1}é"), "\"a \\\"b\\\" \\\\ c\\n\\t\\u{1}é\"");
        assert_eq!(swift_string("\\(x)"), "\"\\\\(x)\"");
    }

    #[test]
    fn names_and_bundle_ids() {
        assert_eq!(app_type_name("Atelier Styles").unwrap(), "AtelierStylesApp");
        assert_eq!(app_type_name("ink-app").unwrap(), "InkApp");
        assert!(app_type_name("1abc").is_err());
        assert!(app_type_name("a\"b").is_err());
        assert_eq!(bundle_id(None, "Atelier Styles").unwrap(), "com.example.atelierstyles");
        assert!(bundle_id(Some("nodots"), "x").is_err());
        assert!(bundle_id(Some("com..x"), "x").is_err());
        assert!(bundle_id(Some("com.ex ample.x"), "x").is_err());
    }
}
