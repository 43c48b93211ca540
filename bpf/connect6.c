/* cgroup/connect6, attached to each captured pod's cgroup: connect4's twin for IPv6 sockets. A
 * native IPv6 destination goes to [::1]:15001 (where nftables' redirect sends IPv6); an IPv4
 * address dialled on a dual-stack socket (::ffff:a.b.c.d) is IPv4 traffic and goes to
 * ::ffff:127.0.0.1:15001, as nftables would redirect its IPv4 packets. Same exclusions.
 */
#include "capture.h"

int connect6(struct bpf_sock_addr *ctx)
{
	__u64 netns;
	struct pod_config *pod = captured(ctx, &netns);
	if (!pod)
		return 1;
	struct origin dialled;
	__builtin_memset(&dialled, 0, sizeof(dialled));
	dialled.addr[0] = ctx->user_ip6[0];
	dialled.addr[1] = ctx->user_ip6[1];
	dialled.addr[2] = ctx->user_ip6[2];
	dialled.addr[3] = ctx->user_ip6[3];
	dialled.port = (__u16)ctx->user_port;
	dialled.v4 = is_v4_mapped(dialled.addr);
	if (!remembered(ctx, netns, pod, &dialled))
		return 1;
	if (dialled.v4) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(OUTBOUND_PORT);
	return 1;
}
