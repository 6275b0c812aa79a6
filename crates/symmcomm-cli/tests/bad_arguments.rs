//! Arguments out of range are refused before anything runs: a non-zero exit and a message that
//! names the argument (and says why), never a silent run of nothing, or of 1000 threads.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_symmcomm");

/// (arguments, what the message must contain).
#[rustfmt::skip]
const CASES: &[(&str, &str)] = &[
    // Ranks.
    ("bench --backend host --world 0", "'--world <WORLD>'"),
    ("bench --backend host --world 1000", "'--world <WORLD>'"),
    ("check --backend gpu", "'--backend <BACKEND>'"),
    ("check --backend host --timeout 0", "'--timeout <TIMEOUT>'"),
    ("check --backend host --timeout 18446744073709551615", "'--timeout <TIMEOUT>'"),
    ("check --backend host --dcp-size 0", "'--dcp-size <DCP_SIZE>'"),
    ("check --backend host --dcp-size 4", "--dcp-size 4 is more than the job's 2 ranks"),
    ("check --backend host --seed -3", "'--seed <SEED>'"),
    // check.
    ("check --backend host --elems 7,0", "'--elems <ELEMS>'"),
    ("check --backend host --elems 1099511627776", "'--elems <ELEMS>'"),
    // bench and tune.
    ("bench --backend host --sizes 0", "'--sizes <SIZES>'"),
    ("bench --backend host --sizes 99999999999G", "'--sizes <SIZES>'"),
    ("bench --backend host --sizes 2X", "'--sizes <SIZES>'"),
    ("bench --backend host --iters 0", "'--iters <ITERS>'"),
    ("bench --backend host --graph-ops 0", "'--graph-ops <GRAPH_OPS>'"),
    ("bench --backend host --replays 0", "'--replays <REPLAYS>'"),
    ("bench --backend host --repeats 0", "'--repeats <REPEATS>'"),
    ("bench --backend host --dcp-batches 1,0", "'--dcp-batches <DCP_BATCHES>'"),
    ("bench --backend host --impls nccl,fast", "'--impls <IMPLS>'"),
    ("bench --backend host --dcp-impls nope", "'--dcp-impls <DCP_IMPLS>'"),
    ("bench --backend host --norm-tokens 2,0", "'--norm-tokens <NORM_TOKENS>'"),
    ("bench --backend host --norm-hiddens 12", "'--norm-hiddens <NORM_HIDDENS>'"),
    ("bench --backend host --norm-hiddens 32768", "'--norm-hiddens <NORM_HIDDENS>'"),
    ("bench --backend host --norm-impls fastest", "'--norm-impls <NORM_IMPLS>'"),
    ("bench --backend host --ops all_to_all", "'--ops <OPS>'"),
    ("bench --backend host --dtypes f64", "'--dtypes <DTYPES>'"),
    ("bench --backend host --modes lazy", "'--modes <MODES>'"),
    ("tune --backend host --replays 0", "'--replays <REPLAYS>'"),
    // soak.
    ("soak --backend host --replays 0", "'--replays <REPLAYS>'"),
    ("soak --backend host --check-every 0", "'--check-every <CHECK_EVERY>'"),
    // decode-sim.
    ("decode-sim --backend host --model gpt", "'--model <MODEL>'"),
    ("decode-sim --backend host --configs pp", "'--configs <CONFIGS>'"),
    ("decode-sim --backend host --batch 0", "'--batch <BATCH>'"),
    ("decode-sim --backend host --layers 0", "'--layers <LAYERS>'"),
    ("decode-sim --backend host --heads 0", "'--heads <HEADS>'"),
    ("decode-sim --backend host --kv-lora-rank 0", "'--kv-lora-rank <KV_LORA_RANK>'"),
    ("decode-sim --backend host --replays 0", "'--replays <REPLAYS>'"),
    ("decode-sim --backend host --compute-us -1", "'--compute-us <COMPUTE_US>'"),
    ("decode-sim --backend host --compute-us inf", "'--compute-us <COMPUTE_US>'"),
    ("decode-sim --backend host --model tiny --world 1", "--world 1: decode-sim needs at least 2 ranks"),
    // launch and info.
    ("launch --nproc 0 -- true", "'--nproc <NPROC>'"),
    ("launch --nproc 1000 -- true", "'--nproc <NPROC>'"),
    ("launch --nproc 2 --master-port 0 -- true", "'--master-port <MASTER_PORT>'"),
    ("launch --nproc 2 --timeout 0 -- true", "'--timeout <TIMEOUT>'"),
    ("launch --nproc 2 --nnodes 0 -- true", "'--nnodes <NNODES>'"),
    ("launch --nproc 2 --nnodes 2 -- true", "needs --master-port, the same on every node"),
    ("launch --nproc 2 --nnodes 2 --node-rank 2 --master-port 9 -- true", "--node-rank 2 is outside the job's 2 nodes"),
    ("launch --nproc 4 --simulate-hosts 0 -- true", "'--simulate-hosts <SIMULATE_HOSTS>'"),
    ("launch --nproc 4 --simulate-hosts 3 -- true", "--simulate-hosts 3 does not split this node's 4 ranks"),
    ("info --dcp-size 0", "'--dcp-size <DCP_SIZE>'"),
];

#[test]
fn out_of_range_arguments_are_refused_by_name() {
    let mut wrong = Vec::new();
    for (args, want) in CASES {
        let out = Command::new(EXE)
            .args(args.split_whitespace())
            .output()
            .expect("running symmcomm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(want) {
            wrong.push(format!(
                "symmcomm {}: exit {:?}, want a message with {want:?}, got:\n{stderr}",
                args,
                out.status.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Under `symmcomm launch`, WORLD_SIZE is the job's size: a `--world` that disagrees is refused.
#[test]
fn world_must_agree_with_the_launched_job() {
    let out = Command::new(EXE)
        .args([
            "launch",
            "--nproc",
            "2",
            "--",
            EXE,
            "check",
            "--backend",
            "host",
        ])
        .args(["--world", "3"])
        .output()
        .expect("running symmcomm launch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // The launcher stops the other rank when the first fails: one message at least.
    assert!(
        stderr.contains("] error: --world 3 disagrees with the launched job's WORLD_SIZE=2"),
        "{stderr}"
    );
}
