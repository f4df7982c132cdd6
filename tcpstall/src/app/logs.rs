//! `tcpstall run`'s log lines: the probe plan and the features at start-up,
//! one line per event (`--log-events`), the engine's observations.

use tracing::{debug, info, warn};

use crate::{
    engine::Observation,
    identity::{Owner, netns::PodIdentity},
    kernel::{event::SockEvent, loader},
};

/// `on_demand`: the program loaded at start-up but attached only while a
/// flow needs it (the drop probe's [`loader::DropSwitch`]), logged as such.
pub(super) fn log_plan(plan: &loader::Plan, on_demand: Option<&str>) {
    for p in &plan.probes {
        let failed: Vec<String> = p
            .attempts
            .iter()
            .filter_map(|a| {
                a.error
                    .as_ref()
                    .map(|e| format!("{}: {e}", a.mechanism.as_str()))
            })
            .collect();
        match p.chosen {
            Some(m) if on_demand.is_some() && p.program == on_demand => info!(
                probe = p.probe,
                mechanism = m.as_str(),
                program = p.program.unwrap_or_default(),
                not_used = %failed.join("; "),
                "probe loaded, attached on demand: only while a flow is in a loss episode"
            ),
            Some(m) => info!(
                probe = p.probe,
                mechanism = m.as_str(),
                program = p.program.unwrap_or_default(),
                not_used = %failed.join("; "),
                "probe attached"
            ),
            None if p.disabled.is_some() => info!(
                probe = p.probe,
                flag = p.disabled.unwrap_or_default(),
                "probe off (configured)"
            ),
            None => warn!(probe = p.probe, why = %failed.join("; "), "probe not attached"),
        }
    }
}

/// One line per feature that is off, saying why (WARN when the kernel is
/// the reason: the node lacks something the fleet has).
pub(super) fn log_features(features: &[crate::sweep::features::FeatureStatus]) {
    use crate::sweep::features::FeatureState;
    for f in features {
        match &f.state {
            FeatureState::On => {}
            FeatureState::OffConfig(flag) => {
                info!(
                    feature = f.name,
                    what = f.what,
                    flag,
                    "feature off (configured)"
                )
            }
            FeatureState::OffKernel(why) => {
                warn!(feature = f.name, what = f.what, why = %why, "feature off: not available on this kernel")
            }
        }
    }
    let on: Vec<&str> = features
        .iter()
        .filter(|f| f.state == FeatureState::On)
        .map(|f| f.name)
        .collect();
    info!(on = %on.join(","), "features");
}

/// Log one event as a structured line (`--log-events`).
pub(super) fn log_event(e: &SockEvent) {
    let s = e.sock.as_ref();
    let n = e.netns_sysctls.as_ref();
    info!(
        target: "tcpstall::event",
        kind = e.kind.as_str(),
        mechanism = e.mechanism.as_str(),
        ts_ns = e.ts_ns,
        cookie = e.cookie,
        netns = e.netns,
        cgroup_id = e.cgroup_id,
        local = %e.local,
        remote = %e.remote,
        state = e.state.as_str(),
        old_state = e.old_state.as_str(),
        retransmits = e.retransmits,
        backoff = s.map(|s| s.backoff),
        pending = s.map(|s| s.pending),
        ca_state = s.map(|s| s.ca_state),
        probes_out = s.map(|s| s.probes_out),
        rto_jiffies = e.rto_jiffies,
        user_timeout_ms = s.map(|s| s.user_timeout_ms),
        retrans_stamp = s.map(|s| s.retrans_stamp),
        snd_una = e.snd_una,
        snd_wnd = s.map(|s| s.snd_wnd),
        packets_out = e.packets_out,
        retrans_out = e.retrans_out,
        timer_expires = s.map(|s| s.timer_expires),
        jiffies = e.jiffies,
        tcp_retries2 = n.map(|n| n.tcp_retries2),
        sk_err = e.sk_err,
        err_soft = e.err_soft,
        ack_seq = e.ack_seq,
        orphan = e.orphan,
        skaddr = e.skaddr,
        total_retrans = e.total_retrans,
        rto_max_jiffies = s.map(|s| s.rto_max_jiffies),
        usec_ts = s.map(|s| s.usec_ts),
        lsndtime = s.map(|s| s.lsndtime),
        rcv_tstamp = s.map(|s| s.rcv_tstamp),
        mss_cache = s.map(|s| s.mss_cache),
        sacked_out = s.map(|s| s.sacked_out),
        tcp_orphan_retries = n.map(|n| n.tcp_orphan_retries),
        tcp_rto_max_ms = n.and_then(|n| n.tcp_rto_max_ms),
        syn_retries = s.map(|s| s.syn_retries),
        tcp_syn_retries = n.map(|n| n.tcp_syn_retries),
        tcp_syn_linear_timeouts = n.and_then(|n| n.tcp_syn_linear_timeouts),
        rto_expired_verdict = e.rto_expired_verdict,
        ka_keepopen = s.map(|s| s.keepalive.keepopen),
        ka_time_j = s.map(|s| s.keepalive.time_j),
        ka_intvl_j = s.map(|s| s.keepalive.intvl_j),
        ka_probes = s.map(|s| s.keepalive.probes),
        ka_netns_time_j = s.and_then(|s| s.keepalive.netns).map(|n| n.0),
        ka_netns_intvl_j = s.and_then(|s| s.keepalive.netns).map(|n| n.1),
        ka_netns_probes = s.and_then(|s| s.keepalive.netns).map(|n| n.2),
        ka_lrcvtime = s.map(|s| s.keepalive.lrcvtime),
        ka_timer_expires = s.map(|s| s.keepalive.timer_expires),
        tw_bucket_expiry = e.tw.map(|t| t.bucket_expiry),
        tw_expires = e.tw.map(|t| t.expires),
        tw_netns_fin_timeout_j = e.tw.and_then(|t| t.netns_fin_timeout_j),
        linger2_j = s.map(|s| s.fin.linger2_j),
        netns_fin_timeout_j = s.and_then(|s| s.fin.netns_fin_timeout_j),
        "event"
    );
}

/// Logs the engine facts worth a line each (stall start and end, timeouts).
pub(super) fn log_observation(o: &Observation, owner: Option<&Owner>) {
    match *o {
        Observation::StallReset {
            class,
            cause,
            cookie,
            remote,
            errno,
        } => info!(
            class = class.as_str(),
            cause = cause.as_str(),
            cookie,
            remote = %remote,
            errno,
            "stall ended by a reset (RST)"
        ),
        Observation::StallStarted {
            class,
            cookie,
            remote,
        } => {
            let pod = owner.and_then(|o| o.0.as_ref());
            let process = owner.and_then(|o| o.1.as_ref());
            let s = |f: fn(&PodIdentity) -> &str| pod.map(f).unwrap_or("");
            info!(
                class = class.as_str(),
                cookie,
                remote = %remote,
                pod = s(|p| &p.pod),
                namespace = s(|p| &p.namespace),
                container = s(|p| &p.container),
                pod_uid = s(|p| &p.pod_uid),
                pid = process.map(|p| p.pid),
                comm = process.map(|p| p.comm.as_str()).unwrap_or(""),
                "stall started"
            )
        }
        Observation::StreakEnded {
            remote,
            outcome,
            duration_s,
            rtos,
            stalled: true,
            cookie,
            mss_lowered,
        } => info!(
            remote = %remote,
            cookie,
            outcome = outcome.as_str(),
            duration_s,
            rtos,
            mss_from = mss_lowered.map(|m| m.from),
            mss_to = mss_lowered.map(|m| m.to),
            "retransmission stall ended"
        ),
        Observation::Timeout {
            cookie,
            remote,
            evidence,
            prediction_error_s,
            lead_time_s,
            boundary_s,
            boundary_source,
            ..
        } => info!(
            cookie,
            remote = %remote,
            evidence = evidence.as_str(),
            prediction_error_s,
            lead_time_s,
            boundary_s,
            boundary_source = boundary_source.map(|b| b.to_string()),
            "socket timed out (ETIMEDOUT)"
        ),
        Observation::ZeroWindowEnded {
            cookie,
            remote,
            duration_s,
            probes,
            by,
            at_ns,
        } => debug!(
            cookie,
            remote = %remote,
            duration_s,
            probes,
            by = by.as_str(),
            at_ns,
            "zero-window episode ended"
        ),
        Observation::FlowEvicted {
            netns,
            local,
            remote,
            active,
        } => debug!(
            netns,
            local = %local,
            remote = %remote,
            active,
            "flow table full: evicted a flow"
        ),
        _ => {}
    }
}
