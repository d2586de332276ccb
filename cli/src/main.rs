//! `inflight`: the operator tool (local stack, render, top, scaler). Grows with the issues that need it.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("usage: inflight <up|render|top> (not implemented yet)")
}
