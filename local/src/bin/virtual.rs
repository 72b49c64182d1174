//! `virtual`: Postern's virtual(8) delivery agent (see
//! `postern_local::virtual_agent`).

use postern_common::fatal;
fn main() {
    let (cfg, _args) = postern_common::service::start("virtual");
    let agent = match postern_local::virtual_agent::Agent::new(&cfg) {
        Ok(a) => a,
        Err(e) => fatal!("{e}"),
    };
    postern_common::delivery::serve(&cfg, |job| agent.deliver(job))
}
