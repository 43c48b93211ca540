/* cgroup/connect6, attached to each captured pod's cgroup: connect4's twin for IPv6 sockets. A
 * native IPv6 destination goes to [::1]:15001 (where nftables' redirect sends IPv6); an IPv4
 * address dialled on a dual-stack socket (::ffff:a.b.c.d) is IPv4 traffic and goes to
 * ::ffff:127.0.0.1:15001, as nftables would redirect its IPv4 packets. Same exclusions, and the
 * same DNS capture first: port 53 to [::1]:15053 (::ffff:127.0.0.1:15053 for a v4-mapped one).
 */
#include "capture.h"

int connect6(struct bpf_sock_addr *ctx)
{
	struct origin dialled;
	dialled6(ctx, &dialled);
	__u64 netns;
	struct pod_config *pod = pod_of(ctx, &dialled, &netns);
	if (!pod)
		return 1;
	if (to_dns_proxy(ctx, pod, &dialled))
		to_loopback6(ctx, dialled.v4, DNS_PROXY_PORT);
	else if (remembered(ctx, netns, pod, &dialled))
		to_loopback6(ctx, dialled.v4, OUTBOUND_PORT);
	return 1;
}
