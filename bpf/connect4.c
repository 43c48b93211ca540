/* cgroup/connect4, attached to each captured pod's cgroup: an app's TCP connect to a remote IPv4
 * address goes to 127.0.0.1:15001 in the pod's own netns (Envoy's outbound listener), as
 * nftables' `redirect to :15001` does, but before any packet exists: no NAT, no conntrack.
 * The dialled address is remembered by socket cookie until sockops learns the source port.
 * Skipped as in nftables.py's output chain: non-TCP, Envoy's sockets (mark 0x539), loopback and
 * the pod's own addresses, the Istio annotations' excluded ranges and ports.
 * DNS capture comes first, as nftables' DNS rule does: a TCP or UDP connect to port 53 (glibc
 * connects its UDP socket to each nameserver) of a pod capturing DNS goes to the DNS proxy,
 * 127.0.0.1:15053, whatever the resolver (loopback ones too); marked sockets (the proxy's own
 * upstream queries) are left alone. recvmsg4/getpeername4 then show the resolver dialled.
 */
#include "capture.h"

int connect4(struct bpf_sock_addr *ctx)
{
	struct origin dialled;
	dialled4(ctx, &dialled);
	__u64 netns;
	struct pod_config *pod = pod_of(ctx, &dialled, &netns);
	if (!pod)
		return 1;
	if (to_dns_proxy(ctx, pod, &dialled))
		to_loopback4(ctx, DNS_PROXY_PORT);
	else if (remembered(ctx, netns, pod, &dialled))
		to_loopback4(ctx, OUTBOUND_PORT);
	return 1;
}
