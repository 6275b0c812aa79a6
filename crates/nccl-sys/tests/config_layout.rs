//! `Config`'s layout against the C compiler's: a program built from the transcribed
//! `struct ncclConfig_v22800` prints `sizeof` and every `offsetof`.

mod common;

use std::mem::offset_of;
use std::process::Command;

use common::{CONFIG_STRUCT, compile, have_cc};
use nccl_sys::Config;

const C_FIELDS: [&str; 17] = [
    "size",
    "magic",
    "version",
    "blocking",
    "cgaClusterSize",
    "minCTAs",
    "maxCTAs",
    "netName",
    "splitShare",
    "trafficClass",
    "commName",
    "collnetEnable",
    "CTAPolicy",
    "shrinkShare",
    "nvlsCTAs",
    "nChannelsPerNetPeer",
    "nvlinkCentricSched",
];

#[test]
fn config_matches_the_c_compilers_layout() {
    if !have_cc("config_matches_the_c_compilers_layout") {
        return;
    }
    let rust_offsets = [
        offset_of!(Config, size),
        offset_of!(Config, magic),
        offset_of!(Config, version),
        offset_of!(Config, blocking),
        offset_of!(Config, cga_cluster_size),
        offset_of!(Config, min_ctas),
        offset_of!(Config, max_ctas),
        offset_of!(Config, net_name),
        offset_of!(Config, split_share),
        offset_of!(Config, traffic_class),
        offset_of!(Config, comm_name),
        offset_of!(Config, collnet_enable),
        offset_of!(Config, cta_policy),
        offset_of!(Config, shrink_share),
        offset_of!(Config, nvls_ctas),
        offset_of!(Config, n_channels_per_net_peer),
        offset_of!(Config, nvlink_centric_sched),
    ];

    let mut source = format!(
        "#include <stddef.h>\n#include <stdio.h>\n{CONFIG_STRUCT}\nint main(void) {{\n\
         printf(\"%zu %zu\\n\", sizeof(ncclConfig_t), _Alignof(ncclConfig_t));\n"
    );
    for field in C_FIELDS {
        source.push_str(&format!(
            "printf(\"%zu\\n\", offsetof(ncclConfig_t, {field}));\n"
        ));
    }
    source.push_str("return 0;\n}\n");

    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("config_layout");
    compile(&source, &program, &[]);
    let output = Command::new(&program)
        .output()
        .expect("run the layout program");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines();
    let sizes: Vec<usize> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(sizes, [size_of::<Config>(), align_of::<Config>()]);
    let c_offsets: Vec<usize> = lines.map(|line| line.parse().unwrap()).collect();
    for ((field, c), rust) in C_FIELDS.iter().zip(&c_offsets).zip(rust_offsets) {
        assert_eq!(*c, rust, "offset of {field}");
    }
    assert_eq!(c_offsets.len(), C_FIELDS.len());
}
