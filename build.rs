//! Build script: compiles every `kernels/*.cu` with nvcc into a fatbin embedded in the binary,
//! and generates the Rust side of `kernels/params.h` with bindgen.
//!
//! - nvcc is found through `NVCC` (a path), then `CUDA_HOME`/`CUDA_PATH` (`<dir>/bin/nvcc`), then
//!   `PATH`. `scripts/install-nvcc.sh` installs the pinned CUDA 13.0 compiler and prints its path.
//! - Each `.cu` becomes one fatbin holding SASS for every architecture of `SD21_CUDA_ARCHS`
//!   (default `80,86,89,90`) plus PTX of the newest one, so later GPUs can JIT it. `90a` style
//!   entries get SASS only (their PTX runs on that exact chip alone). A `*_sm90a.cu` file (Hopper's
//!   wgmma) is built for `sm_90a` alone, whatever `SD21_CUDA_ARCHS` says; the backend loads it
//!   only on compute capability 9.0.
//! - Found: the fatbins and the bindings land in `OUT_DIR`, `cargo:rustc-cfg=sd21_kernels` is set
//!   and `OUT_DIR/kernels.rs` lists the embedded modules. bindgen needs libclang, which is looked
//!   for only here, so a machine without nvcc needs no libclang either.
//! - Not found (or found but libclang missing): the crate still builds, without `sd21_kernels`; the
//!   CUDA backend then refuses to start and says why (`SD21_KERNELS_MISSING`). With
//!   `SD21_REQUIRE_CUDA=1` that is a build error instead (CI sets it). A kernel that fails to
//!   compile is always a build error, and so is a Hopper kernel whose ptxas report shows wgmma
//!   serialized or a register spill (`kernels/ptxas.rs`).
//! - The CPU backend's GEMM: when oneDNN's `libdnnl.so` is found (`SD21_ONEDNN_LIB_DIR`, then the
//!   usual library folders; Debian: `apt-get install libdnnl-dev`), it is linked and
//!   `cargo:rustc-cfg=sd21_onednn` is set; otherwise the `gemm` crate does every product (about
//!   half the speed on AVX-512 machines) and the build says so. `SD21_REQUIRE_ONEDNN=1` makes its
//!   absence a build error (CI sets it).

#[path = "kernels/ptxas.rs"]
mod ptxas;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const DEFAULT_ARCHS: &str = "80,86,89,90";
const KERNEL_DIR: &str = "kernels";

fn main() {
    link_onednn();
    println!("cargo::rustc-check-cfg=cfg(sd21_kernels)");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "SD21_CUDA_ARCHS",
        "SD21_REQUIRE_CUDA",
        "SD21_NVCC_FLAGS",
        "LIBCLANG_PATH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed={KERNEL_DIR}");
    let sources = kernel_files();
    for f in &sources.all {
        println!("cargo::rerun-if-changed={}", f.display());
    }

    let require = env::var("SD21_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let nvcc =
        match find_nvcc() {
            Ok(Some(nvcc)) => nvcc,
            Ok(None) => return without_kernels(
                require,
                "nvcc was not found at build time (looked at NVCC, CUDA_HOME, CUDA_PATH and PATH; \
                 scripts/install-nvcc.sh installs it)",
            ),
            Err(message) => panic!("{message}"),
        };
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    // Bindings first: without libclang nothing below is usable.
    if let Err(e) = generate_bindings(&out_dir) {
        return without_kernels(
            require,
            &format!(
                "bindgen could not process {KERNEL_DIR}/params.h ({e}); it needs libclang \
                 (Debian: apt-get install libclang-dev)"
            ),
        );
    }

    let archs = parse_archs(&env::var("SD21_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into()));
    let version = nvcc_version(&nvcc);
    let jobs = env::var("NUM_JOBS").unwrap_or_else(|_| "1".into());
    let extra: Vec<String> = env::var("SD21_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();

    let hopper_only = vec!["-gencode=arch=compute_90a,code=sm_90a".to_string()];
    let mut listing = String::new();
    let mut usage = String::new();
    let started = Instant::now();
    let mut total_bytes = 0u64;
    for cu in &sources.cu {
        let stem = cu
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 kernel file name");
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("-fatbin")
            .arg("-O3")
            .arg("-std=c++17")
            .arg("--resource-usage")
            .arg(format!("--threads={jobs}"))
            .arg("-I")
            .arg(KERNEL_DIR)
            .args(if stem.ends_with("_sm90a") {
                &hopper_only
            } else {
                &archs.gencode
            })
            .args(&extra)
            .arg("-o")
            .arg(&fatbin)
            .arg(cu);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            panic!("nvcc failed on {}:\n{cmd:?}\n{log}", cu.display());
        }
        if stem.ends_with("_sm90a") {
            let problems = ptxas::hopper_problems(&log);
            if !problems.is_empty() {
                panic!(
                    "{}: ptxas reports what a Hopper kernel must not have:\n{}\n\n{log}",
                    cu.display(),
                    problems.join("\n")
                );
            }
        }
        let _ = writeln!(usage, "== {} ==\n{log}", cu.display());
        total_bytes += fs::metadata(&fatbin).map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(
            listing,
            "    (\"{stem}\", include_bytes!({:?})),",
            fatbin.display().to_string()
        );
    }
    fs::write(out_dir.join("kernels-resource-usage.txt"), usage).expect("write usage log");

    let generated = format!(
        "/// The embedded kernel modules: (file stem of `kernels/*.cu`, fatbin).\n\
         pub const MODULES: &[(&str, &[u8])] = &[\n{listing}];\n\
         /// What compiled them.\n\
         pub const NVCC_VERSION: &str = {version:?};\n\
         /// The SASS architectures in each fatbin, and the PTX one.\n\
         pub const ARCHS: &str = {:?};\n",
        archs.describe
    );
    fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
    println!("cargo::rustc-cfg=sd21_kernels");
    println!(
        "cargo::rustc-env=SD21_KERNEL_BUILD_INFO={} kernel files, {} bytes of fatbin, {:.1} s, {}",
        sources.cu.len(),
        total_bytes,
        started.elapsed().as_secs_f64(),
        archs.describe
    );
}

/// Links oneDNN for the CPU backend's GEMM when its library is found (module docs).
fn link_onednn() {
    println!("cargo::rustc-check-cfg=cfg(sd21_onednn)");
    println!("cargo::rerun-if-env-changed=SD21_ONEDNN_LIB_DIR");
    println!("cargo::rerun-if-env-changed=SD21_REQUIRE_ONEDNN");
    let given = env::var_os("SD21_ONEDNN_LIB_DIR").map(PathBuf::from);
    let usual = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/lib",
        "/usr/lib64",
        "/usr/lib",
    ];
    let candidates: Vec<PathBuf> = match given {
        Some(dir) => vec![dir],
        None => usual.iter().map(PathBuf::from).collect(),
    };
    match candidates.iter().find(|d| d.join("libdnnl.so").exists()) {
        Some(dir) => {
            println!("cargo::rustc-link-search=native={}", dir.display());
            println!("cargo::rustc-link-lib=dylib=dnnl");
            // Debian's oneDNN runs on OpenMP; the backend sets each call's team size itself.
            println!("cargo::rustc-link-lib=dylib=gomp");
            println!("cargo::rustc-cfg=sd21_onednn");
        }
        None if env::var("SD21_REQUIRE_ONEDNN").is_ok_and(|v| v == "1") => panic!(
            "SD21_REQUIRE_ONEDNN=1 but libdnnl.so is in none of {candidates:?} \
             (Debian: apt-get install libdnnl-dev)"
        ),
        None => println!(
            "cargo::warning=building the CPU backend without oneDNN (libdnnl.so not found in \
             {candidates:?}; Debian: apt-get install libdnnl-dev): every GEMM goes through the \
             gemm crate, about half as fast on AVX-512 machines"
        ),
    }
}

/// Builds the crate without kernels (or fails, under `SD21_REQUIRE_CUDA=1`).
fn without_kernels(require: bool, reason: &str) {
    if require {
        panic!("SD21_REQUIRE_CUDA=1 but {reason}");
    }
    println!("cargo::warning=building without CUDA kernels: {reason}");
    println!("cargo::rustc-env=SD21_KERNELS_MISSING={reason}");
}

struct Sources {
    /// Every `.cu` (compiled).
    cu: Vec<PathBuf>,
    /// Every `.cu`, `.cuh` and `.h` (watched).
    all: Vec<PathBuf>,
}

fn kernel_files() -> Sources {
    let mut all: Vec<PathBuf> = fs::read_dir(KERNEL_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("cu" | "cuh" | "h")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    let cu = all
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .cloned()
        .collect();
    Sources { cu, all }
}

/// `NVCC`, then `CUDA_HOME`/`CUDA_PATH`, then `PATH`. A set `NVCC` that is not a file is an error:
/// someone asked for that compiler.
fn find_nvcc() -> Result<Option<PathBuf>, String> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(Some(p))
        } else {
            Err(format!("NVCC={} is not a file", p.display()))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = Path::new(&dir).join("bin").join("nvcc");
            if p.is_file() {
                return Ok(Some(p));
            }
        }
    }
    Ok(env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    }))
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("could not run {} --version: {e}", nvcc.display()));
    if !out.status.success() {
        panic!(
            "{} --version failed: {}",
            nvcc.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

struct Archs {
    gencode: Vec<String>,
    describe: String,
}

/// `"80,86,sm_89 90"` → `-gencode` flags: SASS for each, PTX for the newest portable one.
fn parse_archs(spec: &str) -> Archs {
    let mut archs: Vec<String> = spec
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let a = s.trim_start_matches("sm_").trim_start_matches("compute_");
            let digits = a.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                panic!("SD21_CUDA_ARCHS: `{s}` is not an architecture like 80, 90 or sm_90a");
            }
            a.to_string()
        })
        .collect();
    if archs.is_empty() {
        panic!("SD21_CUDA_ARCHS is empty");
    }
    archs.dedup();
    let mut gencode: Vec<String> = archs
        .iter()
        .map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}"))
        .collect();
    let ptx = archs
        .iter()
        .filter(|a| a.chars().all(|c| c.is_ascii_digit()))
        .max_by_key(|a| a.parse::<u32>().unwrap_or(0));
    if let Some(p) = ptx {
        gencode.push(format!("-gencode=arch=compute_{p},code=compute_{p}"));
    }
    let describe = format!(
        "SASS sm_{}{}",
        archs.join(", sm_"),
        ptx.map(|p| format!(" + PTX compute_{p}"))
            .unwrap_or_default()
    );
    Archs { gencode, describe }
}

fn generate_bindings(out_dir: &Path) -> Result<(), String> {
    let header = Path::new(KERNEL_DIR).join("params.h");
    // clang-sys panics (rather than erring) in a few libclang-missing paths: contain it.
    let result = std::panic::catch_unwind(|| {
        bindgen::Builder::default()
            .header(header.display().to_string())
            .allowlist_file(".*params\\.h")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(true)
            .generate_comments(true)
            .formatter(bindgen::Formatter::None)
            .generate()
    });
    let bindings = match result {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("libclang could not be loaded".into()),
    };
    bindings
        .write_to_file(out_dir.join("params.rs"))
        .map_err(|e| e.to_string())
}
