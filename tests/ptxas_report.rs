//! build.rs fails a Hopper kernel's build on ptxas's word: these are the reports it must refuse
//! and the one it must pass (kernels/ptxas.rs).

#[path = "../kernels/ptxas.rs"]
mod ptxas;

const CLEAN: &str =
    "ptxas info    : Compiling entry function 'conv2d_implicit_gemm_sm90' for 'sm_90a'
ptxas info    : Function properties for conv2d_implicit_gemm_sm90
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 126 registers, used 1 barriers";

#[test]
fn a_clean_report_passes() {
    assert_eq!(ptxas::hopper_problems(CLEAN), Vec::<String>::new());
}

#[test]
fn serialized_wgmma_fails() {
    let log = format!(
        "{CLEAN}\nptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions \
         are serialized due to the presence of Extern calls in the function \
         'flash_attention_d64_sm90'."
    );
    let problems = ptxas::hopper_problems(&log);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("serialized"), "{problems:?}");
}

#[test]
fn a_spill_fails_and_names_the_kernel() {
    let log = CLEAN.replace(
        "0 bytes spill stores, 0 bytes spill loads",
        "8 bytes spill stores, 8 bytes spill loads",
    );
    let problems = ptxas::hopper_problems(&log);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("conv2d_implicit_gemm_sm90 spills"),
        "{problems:?}"
    );
    let loads_only = CLEAN.replace("0 bytes spill loads", "4 bytes spill loads");
    assert_eq!(ptxas::hopper_problems(&loads_only).len(), 1);
}
