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
	__builtin_memset(&dialled, 0, sizeof(dialled));
	dialled.addr[0] = ctx->user_ip6[0];
	dialled.addr[1] = ctx->user_ip6[1];
	dialled.addr[2] = ctx->user_ip6[2];
	dialled.addr[3] = ctx->user_ip6[3];
	dialled.port = (__u16)ctx->user_port;
	dialled.v4 = is_v4_mapped(dialled.addr);
	__u64 netns;
	struct pod_config *pod = pod_of(ctx, &dialled, &netns);
	if (!pod)
		return 1;
	if (to_dns_proxy(ctx, pod, &dialled)) {
		to_loopback6(ctx, dialled.v4, DNS_PROXY_PORT);
		return 1;
	}
	if (!remembered(ctx, netns, pod, &dialled))
		return 1;
	to_loopback6(ctx, dialled.v4, OUTBOUND_PORT);
	return 1;
}
