//! `pipe`: Postern's pipe(8) delivery agent (see
//! `postern_local::pipe_agent`). master.cf passes the service's
//! attributes (`flags= user= argv=...`) as arguments.
fn main() {
    let (cfg, args) = postern_common::service::start("pipe");
    let agent = postern_local::pipe_agent::Agent::new(&cfg, &args.service, &args.rest);
    postern_common::delivery::serve(&cfg, |job| agent.deliver(job))
}
