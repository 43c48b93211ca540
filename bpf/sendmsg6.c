/* cgroup/sendmsg6, attached to each captured pod's cgroup: sendmsg4's twin for IPv6 sockets: an
 * unconnected datagram to port 53 goes to the DNS proxy at [::1]:15053. (An IPv4 address on a
 * dual-stack socket, ::ffff:a.b.c.d, is sent by the kernel's IPv4 path and meets sendmsg4.)
 */
#include "capture.h"

int sendmsg6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(DNS_PORT))
		return 1;
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
	if (!pod || !to_dns_proxy(ctx, pod, &dialled))
		return 1;
	to_loopback6(ctx, dialled.v4, DNS_PROXY_PORT);
	return 1;
}
