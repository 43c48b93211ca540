/* sk_lookup, linked to each captured pod's network namespace: a TCP connection arriving for the
 * pod (a SYN to one of its addresses, on a captured port) is handed to the pod's inbound listener,
 * Envoy's 0.0.0.0:15006 in that netns, taken from the listeners sockhash, as nftables' prerouting
 * `redirect to :15006` does, but without rewriting anything: no NAT, no conntrack, and the
 * accepted socket's local address is what the peer dialled (Envoy's original_dst reads it).
 * Left alone as in nftables.py's prerouting chain: non-TCP, the node's probe source
 * 169.254.7.127, port 15008, excludeInboundPorts and ports outside includeInboundPorts, and
 * connections from the pod itself (the app calling itself, Envoy delivering to the app from
 * inside the pod: nftables' nat prerouting never sees those, nor their 0x539 mark, which does
 * not survive leaving a netns anyway). Those come over lo, but to the pod's own IP the kernel
 * reports eth0 as ingress_ifindex (the device of the address's route), so they are told by
 * their source: a loopback address or one of the pod's (the kernel drops such a source
 * arriving from outside as martian).
 * Fail closed: a captured port with no listener in the map (Envoy restarting, not yet steered)
 * is dropped (the peer gets a reset), never passed to the app.
 */
#include "capture.h"

#define SK_DROP 0
#define SK_PASS 1

int sklookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	__u32 port = ctx->local_port;
	if (port == HBONE_PORT)
		return SK_PASS;
	struct addr_key local, remote;
	if (ctx->family == AF_INET) {
		__u32 peer4 = ctx->remote_ip4;
		if (peer4 == bpf_htonl(PROBE_SOURCE) || (bpf_ntohl(peer4) >> 24) == 127)
			return SK_PASS;
		v4_mapped(local.addr, ctx->local_ip4);
		v4_mapped(remote.addr, peer4);
	} else {
		local.addr[0] = ctx->local_ip6[0];
		local.addr[1] = ctx->local_ip6[1];
		local.addr[2] = ctx->local_ip6[2];
		local.addr[3] = ctx->local_ip6[3];
		remote.addr[0] = ctx->remote_ip6[0];
		remote.addr[1] = ctx->remote_ip6[1];
		remote.addr[2] = ctx->remote_ip6[2];
		remote.addr[3] = ctx->remote_ip6[3];
		if (!remote.addr[0] && !remote.addr[1] && !remote.addr[2] &&
		    remote.addr[3] == bpf_htonl(1))
			return SK_PASS;
	}
	/* An address the agent did not record is still the pod's (this runs in its netns only) */
	__u64 *owner = pod_addrs.lookup(&local);
	if (!owner)
		return SK_DROP;
	__u64 netns = *owner;
	__u64 *peer = pod_addrs.lookup(&remote);
	if (peer && *peer == netns)
		return SK_PASS;
	struct pod_config *pod = pods.lookup(&netns);
	if (!pod || !(pod->flags & POD_CAPTURE_IN))
		return SK_PASS;
	struct port_key pk;
	__builtin_memset(&pk, 0, sizeof(pk));
	pk.netns = netns;
	pk.port = port;
	__u8 *listed = ports_in.lookup(&pk);
	if (listed && *listed == PORT_IN_EXCLUDED)
		return SK_PASS;
	if (!(pod->flags & POD_INBOUND_ALL) && !(listed && *listed == PORT_IN_INCLUDED))
		return SK_PASS;
	struct bpf_sock *sk = (struct bpf_sock *)listeners.lookup(&netns);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}
