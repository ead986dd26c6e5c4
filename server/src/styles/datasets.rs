//! Uploaded training datasets: images and `.txt` captions (zips are unpacked, each image
//! paired with its caption), one folder per dataset under `DATA/trainings/datasets/ID/`,
//! and the report of what a training will see in one.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use app::dto::{DatasetImage, DatasetSkip, DatasetSummary, StyleTrainingRequest};
use atelier_engine::style::dataset::scan;

use crate::ApiError;

/// Most files one dataset may hold (after unpacking zips).
pub const MAX_DATASET_FILES: usize = 2000;
/// Most bytes the files of one zip may unpack to.
pub const MAX_UNZIPPED_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// The uploaded datasets of a studio.
pub struct Datasets {
    root: PathBuf,
    incoming: PathBuf,
    /// Side of the square images the model makes (images are checked against it).
    resolution: u32,
}

impl Datasets {
    /// Opens `root` (`DATA/trainings`): datasets in `root/datasets`, uploads received in
    /// `root/incoming` (pieces of uploads cut off by a restart are removed).
    pub fn open(root: &Path, resolution: u32) -> std::io::Result<Self> {
        let datasets = root.join("datasets");
        std::fs::create_dir_all(&datasets)?;
        let incoming = root.join("incoming");
        let _ = std::fs::remove_dir_all(&incoming);
        Ok(Self { root: datasets, incoming, resolution })
    }

    /// The folder of dataset `id` (a uuid), or 404.
    pub fn dir(&self, id: &str) -> Result<PathBuf, ApiError> {
        let dir = self.root.join(id);
        if uuid::Uuid::parse_str(id).is_err() || !dir.is_dir() {
            return Err(ApiError::NotFound { what: "dataset", id: id.to_string() });
        }
        Ok(dir)
    }

    /// Where uploads are received before [`Datasets::add_files`] takes them.
    pub fn incoming_dir(&self) -> PathBuf {
        self.incoming.clone()
    }

    /// Adds uploaded files (images, `.txt` captions, or zips of them) to the dataset `into`,
    /// or to a new one, and reports what it holds. `files` are (name as uploaded, temporary
    /// file); the temporary files are moved or removed. Blocking: decodes every image.
    pub fn add_files(&self, into: Option<&str>, files: Vec<(String, PathBuf)>) -> Result<DatasetSummary, ApiError> {
        let (id, dir) = match into {
            Some(id) => (id.to_string(), self.dir(id)?),
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                let dir = self.root.join(&id);
                std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
                (id, dir)
            }
        };
        let result = add_uploaded(&dir, &files);
        for (_, tmp) in &files {
            let _ = std::fs::remove_file(tmp);
        }
        result?;
        // A new DVC version of the dataset (none when the content did not change).
        crate::datasets::training_dataset(&dir)?;
        self.dataset(&id)
    }

    /// What the dataset `id` holds, as the training will see it.
    pub fn dataset(&self, id: &str) -> Result<DatasetSummary, ApiError> {
        let dir = self.dir(id)?;
        let min_images = StyleTrainingRequest::default().min_images;
        let report = scan(&dir, "TRIGGER", self.resolution, min_images)?;
        let name = |p: &Path| p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut skipped: Vec<DatasetSkip> = report.rejected.iter().map(|r| DatasetSkip { file: name(&r.path), reason: r.reason.clone() }).collect();
        skipped.extend(report.duplicates.iter().map(|d| DatasetSkip { file: name(&d.path), reason: d.reason() }));
        Ok(DatasetSummary {
            id: id.to_string(),
            images: report
                .items
                .iter()
                .map(|i| DatasetImage {
                    file: name(&i.path),
                    width: i.width,
                    height: i.height,
                    caption: i.caption_from_file.then(|| i.caption.clone()),
                    caption_note: i.caption_note.clone(),
                })
                .collect(),
            skipped,
            resolution: report.resolution,
            min_images,
            usable: report.is_usable(),
        })
    }

    /// A file of a dataset (for thumbnails).
    pub fn dataset_file(&self, id: &str, file: &str) -> Result<PathBuf, ApiError> {
        let dir = self.dir(id)?;
        let not_found = || ApiError::NotFound { what: "dataset file", id: format!("{id}/{file}") };
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(not_found());
        }
        let path = dir.join(file);
        if path.is_file() { Ok(path) } else { Err(not_found()) }
    }
}

/// letters, digits, `.`, `-`, `_` and spaces replaced.
fn safe_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base.chars().map(|c| if c.is_alphanumeric() || ".-_ ".contains(c) { c } else { '_' }).collect();
    let clean = clean.trim().trim_start_matches('.').to_string();
    (!clean.is_empty()).then_some(clean)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn is_zip(name: &str, tmp: &Path) -> bool {
    let mut magic = [0u8; 4];
    let starts_like_zip = std::fs::File::open(tmp).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"PK\x03\x04";
    starts_like_zip || name.to_ascii_lowercase().ends_with(".zip")
}

/// Adds one upload's files to `dir`: the loose files together (so a caption travels with
/// its image when a name is taken), then each zip. All or nothing per zip and for the
/// loose files.
fn add_uploaded(dir: &Path, files: &[(String, PathBuf)]) -> Result<(), ApiError> {
    let (zips, loose): (Vec<_>, Vec<_>) = files.iter().partition(|(name, tmp)| is_zip(name, tmp));
    let loose: Vec<(&str, &Path)> = loose.iter().map(|(n, t)| (n.as_str(), t.as_path())).collect();
    add_loose(dir, &loose)?;
    for (name, tmp) in zips {
        unzip(dir, name, tmp)?;
    }
    Ok(())
}

/// Where a file goes when it is added to a dataset folder.
struct Incoming {
    /// The folders it sat in (inside a zip), each made safe; empty for loose files.
    folder: Vec<String>,
    /// Its safe file name.
    name: String,
    /// Its path as uploaded, for messages.
    shown: String,
}

impl Incoming {
    fn new(path: &str) -> Option<Self> {
        let name = safe_name(path)?;
        let mut parts: Vec<&str> = path.split(['/', '\\']).collect();
        parts.pop();
        let folder = parts.into_iter().filter_map(safe_name).collect();
        Some(Self { folder, name, shown: path.to_string() })
    }
}

/// `name` as (stem, extension with its dot); a name without a stem is all stem.
fn split_name(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    }
}

fn is_caption_name(name: &str) -> bool {
    split_name(name).1.eq_ignore_ascii_case(".txt")
}

/// The flat names under which `files` join the dataset folder that already holds
/// `existing`, in the order of `files`.
///
/// The dataset pairs an image with the caption of the same stem (any case), so names are
/// given per (folder, stem) group, never per file: an image and its caption keep one stem.
/// Groups whose stem repeats in another folder are all named after their folders
/// (`a/1.png` → `a_1.png`; `b/1.png` + `b/1.txt` → `b_1.png` + `b_1.txt`), and a stem that
/// is still taken (in the folder, or by the batch) gets `-2`, `-3`, … for the whole group,
/// so the result does not depend on the order of the entries. A caption alone joins an
/// existing image of its stem that has none; a lone image and a lone caption of one stem
/// in two folders (`images/1.png`, `captions/1.txt`) stay a pair.
///
/// Errors (the message for people): two captions for one image, or two images of the same
/// name sharing one caption; no guess is made about which belongs to which.
fn plan_names(existing: &[String], files: &[Incoming]) -> Result<Vec<String>, String> {
    // (folder, stem) in lower case, as the dataset pairs names → indices into `files`.
    let mut groups: std::collections::BTreeMap<(Vec<String>, String), Vec<usize>> = std::collections::BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let key = (f.folder.iter().map(|p| p.to_lowercase()).collect(), split_name(&f.name).0.to_lowercase());
        groups.entry(key).or_default().push(i);
    }
    // Units share one stem; a group is one unit unless it holds same-named images and no caption.
    let mut units: Vec<(Vec<String>, String, Vec<usize>)> = Vec::new();
    for ((_, stem), members) in groups {
        let folder = files[members[0]].folder.clone();
        let (captions, contents): (Vec<usize>, Vec<usize>) = members.iter().partition(|&&i| is_caption_name(&files[i].name));
        if let [a, b, ..] = captions.as_slice() {
            return Err(format!("{} and {} are both captions of the same image; keep one", files[*a].shown, files[*b].shown));
        }
        let mut names: Vec<(String, usize)> = contents.iter().map(|&i| (files[i].name.to_lowercase(), i)).collect();
        names.sort();
        let same_name = names.windows(2).find(|w| w[0].0 == w[1].0).map(|w| (w[0].1, w[1].1));
        match (same_name, captions.first()) {
            (Some((a, b)), Some(c)) => {
                return Err(format!(
                    "{} and {} have the same name and would share the caption {}; rename one",
                    files[a].shown, files[b].shown, files[*c].shown
                ))
            }
            (Some(_), None) => units.extend(names.into_iter().map(|(_, i)| (folder.clone(), stem.clone(), vec![i]))),
            (None, _) => units.push((folder, stem, members)),
        }
    }
    let kinds = |unit: &[usize]| {
        let captions = unit.iter().filter(|&&i| is_caption_name(&files[i].name)).count();
        (captions > 0, captions < unit.len())
    };
    let mut by_stem: HashMap<String, Vec<usize>> = HashMap::new();
    for (k, (_, stem, _)) in units.iter().enumerate() {
        by_stem.entry(stem.clone()).or_default().push(k);
    }
    // A lone image and a lone caption of one stem, in two folders: one pair.
    for ks in by_stem.values_mut() {
        if let [a, b] = ks[..] {
            let (ka, kb) = (kinds(&units[a].2), kinds(&units[b].2));
            if (ka == (false, true) && kb == (true, false)) || (ka == (true, false) && kb == (false, true)) {
                let (image, caption) = if ka.1 { (a, b) } else { (b, a) };
                let moved = std::mem::take(&mut units[caption].2);
                units[image].2.extend(moved);
                ks.retain(|&k| k == image);
            }
        }
    }
    units.retain(|u| !u.2.is_empty());
    let repeated: std::collections::HashSet<String> = {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for (_, stem, _) in &units {
            *count.entry(stem.as_str()).or_default() += 1;
        }
        count.into_iter().filter(|(_, n)| *n > 1).map(|(s, _)| s.to_string()).collect()
    };
    // What the folder holds, by lower-case stem: (has a caption, has anything else).
    let mut held: HashMap<String, (bool, bool)> = HashMap::new();
    let held_names: std::collections::HashSet<String> = existing.iter().map(|n| n.to_lowercase()).collect();
    for n in existing {
        let e = held.entry(split_name(n).0.to_lowercase()).or_default();
        if is_caption_name(n) {
            e.0 = true;
        } else {
            e.1 = true;
        }
    }
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = vec![String::new(); files.len()];
    for (folder, _, members) in &units {
        let (has_caption, has_content) = kinds(members);
        // The image's spelling of the stem (then the caption's), whatever the entry order.
        let named = members.iter().min_by_key(|&&i| (is_caption_name(&files[i].name), &files[i].name)).copied().unwrap_or(members[0]);
        let stem = split_name(&files[named].name).0;
        let base = if repeated.contains(&stem.to_lowercase()) && !folder.is_empty() {
            format!("{}_{stem}", folder.join("_"))
        } else {
            stem.to_string()
        };
        let free = |candidate: &str| {
            let lc = candidate.to_lowercase();
            let (held_caption, held_content) = held.get(&lc).copied().unwrap_or_default();
            let clash = (has_content && (held_caption || held_content)) || (has_caption && held_caption);
            !clash
                && !taken.contains(&lc)
                && members.iter().all(|&i| !held_names.contains(&format!("{lc}{}", split_name(&files[i].name).1.to_lowercase())))
        };
        let chosen = std::iter::once(base.clone()).chain((2..).map(|k| format!("{base}-{k}"))).find(|c| free(c)).unwrap_or_default();
        taken.insert(chosen.to_lowercase());
        for &i in members {
            out[i] = format!("{chosen}{}", split_name(&files[i].name).1);
        }
    }
    Ok(out)
}

fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

fn too_many(dir: &Path, adding: usize) -> Option<String> {
    (count_files(dir) + adding > MAX_DATASET_FILES).then(|| format!("a dataset holds at most {MAX_DATASET_FILES} files"))
}

/// Moves uploaded files (not zips) into `dir` under the names [`plan_names`] gives them.
fn add_loose(dir: &Path, files: &[(&str, &Path)]) -> Result<(), ApiError> {
    let invalid = |message: String| ApiError::Invalid { field: "files".into(), message };
    let kept: Vec<(Incoming, &Path)> = files.iter().filter_map(|(name, tmp)| Some((Incoming::new(name.rsplit(['/', '\\']).next().unwrap_or(""))?, *tmp))).collect();
    if kept.is_empty() {
        return Ok(());
    }
    if let Some(m) = too_many(dir, kept.len()) {
        return Err(invalid(m));
    }
    let incoming: Vec<Incoming> = kept.iter().map(|(i, _)| Incoming { folder: Vec::new(), name: i.name.clone(), shown: i.shown.clone() }).collect();
    let targets = plan_names(&file_names(dir), &incoming).map_err(invalid)?;
    let mut written = Vec::new();
    for ((_, tmp), target) in kept.iter().zip(&targets) {
        let target = dir.join(target);
        if std::fs::rename(tmp, &target).is_err() {
            if let Err(e) = std::fs::copy(tmp, &target) {
                for p in written {
                    let _ = std::fs::remove_file(p);
                }
                return Err(ApiError::Internal(format!("{}: {e}", target.display())));
            }
        }
        written.push(target);
    }
    Ok(())
}

/// Unpacks the files of a zip into `dir`, flat, each image with its caption (see
/// [`plan_names`]); hidden files and macOS resource forks are left out. Refuses archives
/// that are corrupt, encrypted, unpack to more than [`MAX_UNZIPPED_BYTES`] or pair
/// captions ambiguously, leaving the dataset as it was.
fn unzip(dir: &Path, name: &str, tmp: &Path) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::Invalid { field: "files".into(), message: format!("{name}: {m}") };
    let file = std::fs::File::open(tmp).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a readable zip archive ({e})")))?;
    // First the names, so captions are paired with their images before anything is written.
    let mut wanted: Vec<(usize, Incoming)> = Vec::new();
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| bad(format!("entry {i} cannot be read ({e})")))?;
        let path = entry.name().map_err(|e| bad(format!("entry {i} has an unreadable name ({e})")))?.to_string();
        let last = path.rsplit(['/', '\\']).next().unwrap_or("");
        if entry.is_dir() || last.starts_with('.') || path.split(['/', '\\']).any(|p| p == "__MACOSX") {
            continue;
        }
        if entry.encrypted() {
            return Err(bad(format!("{path} is encrypted; zip it without a password")));
        }
        if let Some(incoming) = Incoming::new(&path) {
            wanted.push((i, incoming));
        }
    }
    if let Some(m) = too_many(dir, wanted.len()) {
        return Err(bad(m));
    }
    let incoming: Vec<Incoming> = wanted.iter().map(|(_, f)| Incoming { folder: f.folder.clone(), name: f.name.clone(), shown: f.shown.clone() }).collect();
    let targets = plan_names(&file_names(dir), &incoming).map_err(bad)?;
    let mut budget = MAX_UNZIPPED_BYTES;
    let mut written = Vec::new();
    let result = (|| {
        for ((i, f), target) in wanted.iter().zip(&targets) {
            let mut entry = archive.by_index(*i).map_err(|e| bad(format!("{} cannot be read ({e})", f.shown)))?;
            let target = dir.join(target);
            atelier_engine::files::write_atomic_with(
                &target,
                |part| {
                    let mut out = std::fs::File::create(part).map_err(|e| ApiError::Internal(e.to_string()))?;
                    let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut out).map_err(|e| bad(format!("{} cannot be unpacked ({e})", f.shown)))?;
                    if n > budget {
                        return Err(bad(format!("unpacks to more than {} MB", MAX_UNZIPPED_BYTES / (1024 * 1024))));
                    }
                    budget -= n;
                    out.flush().map_err(|e| ApiError::Internal(e.to_string()))
                },
                |e| ApiError::Internal(e.to_string()),
            )?;
            written.push(target);
        }
        Ok(())
    })();
    if result.is_err() {
        // All or nothing: a bad archive leaves the dataset as it was.
        for p in written {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploaded_names_are_made_safe() {
        assert_eq!(safe_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(safe_name("C:\\Users\\me\\cat 1.png").as_deref(), Some("cat 1.png"));
        assert_eq!(safe_name(".hidden").as_deref(), Some("hidden"));
        assert_eq!(safe_name("a;b|c.png").as_deref(), Some("a_b_c.png"));
        assert_eq!(safe_name("dir/"), None);
    }

    fn plan(existing: &[&str], paths: &[&str]) -> Result<Vec<String>, String> {
        let existing: Vec<String> = existing.iter().map(|s| s.to_string()).collect();
        let files: Vec<Incoming> = paths.iter().map(|p| Incoming::new(p).unwrap()).collect();
        plan_names(&existing, &files)
    }

    #[test]
    fn an_image_and_its_caption_keep_one_name() {
        // Folders repeat a name: every such group is named after its folder, whatever the order.
        assert_eq!(plan(&[], &["a/1.png", "b/1.png", "b/1.txt"]).unwrap(), ["a_1.png", "b_1.png", "b_1.txt"]);
        assert_eq!(plan(&[], &["b/1.txt", "b/1.png", "a/1.png"]).unwrap(), ["b_1.txt", "b_1.png", "a_1.png"]);
        assert_eq!(plan(&[], &["a/1.png", "b/1.txt"]).unwrap(), ["1.png", "1.txt"], "a lone image and a lone caption stay a pair");
        assert_eq!(plan(&[], &["set/IMG_0001.JPG", "set/IMG_0001.TXT", "set/2.png"]).unwrap(), ["IMG_0001.JPG", "IMG_0001.TXT", "2.png"]);
        // Names taken in the dataset move the whole group.
        assert_eq!(plan(&["cat.png"], &["cat.png", "cat.txt"]).unwrap(), ["cat-2.png", "cat-2.txt"]);
        assert_eq!(plan(&["cat.png", "cat-2.txt"], &["cat.txt", "cat.png"]).unwrap(), ["cat-3.txt", "cat-3.png"]);
        assert_eq!(plan(&["dog.TXT"], &["dog.png"]).unwrap(), ["dog-2.png"], "an old caption does not take a new image");
        assert_eq!(plan(&["cat.png"], &["CAT.txt"]).unwrap(), ["CAT.txt"], "a caption alone joins its image");
        assert_eq!(plan(&["cat.png", "cat.txt"], &["cat.txt"]).unwrap(), ["cat-2.txt"]);
        // Same-named images without a caption are told apart; with one, nobody can tell.
        assert_eq!(plan(&[], &["a.png", "a.png"]).unwrap(), ["a.png", "a-2.png"]);
        let e = plan(&[], &["x/a.png", "y/a.png", "x/A.png", "x/a.txt"]).unwrap_err();
        assert_eq!(e, "x/a.png and x/A.png have the same name and would share the caption x/a.txt; rename one");
        let e = plan(&[], &["x/1.png", "x/1.txt", "x/1.TXT"]).unwrap_err();
        assert_eq!(e, "x/1.txt and x/1.TXT are both captions of the same image; keep one");
        // Climbing folders are dropped.
        assert_eq!(plan(&[], &["../../escape.png"]).unwrap(), ["escape.png"]);
    }
}

