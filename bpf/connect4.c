/* cgroup/connect4, attached to each captured pod's cgroup: an app's TCP connect to a remote IPv4
 * address goes to 127.0.0.1:15001 in the pod's own netns (Envoy's outbound listener), as
 * nftables' `redirect to :15001` does, but before any packet exists: no NAT, no conntrack.
 * The dialled address is remembered by socket cookie until sockops learns the source port.
 * Skipped as in nftables.py's output chain: non-TCP, Envoy's sockets (mark 0x539), loopback and
 * the pod's own addresses, the Istio annotations' excluded ranges and ports.
 */
#include "capture.h"

int connect4(struct bpf_sock_addr *ctx)
{
	__u64 netns;
	struct pod_config *pod = captured(ctx, &netns);
	if (!pod)
		return 1;
	struct origin dialled;
	__builtin_memset(&dialled, 0, sizeof(dialled));
	v4_mapped(dialled.addr, ctx->user_ip4);
	dialled.port = (__u16)ctx->user_port;
	dialled.v4 = 1;
	if (!remembered(ctx, netns, pod, &dialled))
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(OUTBOUND_PORT);
	return 1;
}
