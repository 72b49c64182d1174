//! `spawn`: Postern's spawn(8), a non-Postern program per connection (see
//! `postern_local::spawn_agent`). master.cf passes the service's
//! attributes (`user= argv=...`) as arguments.
fn main() {
    let (cfg, args) = postern_common::service::start("spawn");
    let agent = match postern_local::spawn_agent::Agent::new(&cfg, &args.service, &args.rest) {
        Ok(a) => a,
        Err(e) => postern_common::fatal!("service {}: {e}", args.service),
    };
    postern_common::service::serve_one_at_a_time(&cfg, |conn| agent.serve(conn))
}
