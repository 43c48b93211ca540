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
	dialled6(ctx, &dialled);
	__u64 netns;
	struct pod_config *pod = pod_of(ctx, &dialled, &netns);
	if (pod && to_dns_proxy(ctx, pod, &dialled))
		to_loopback6(ctx, dialled.v4, DNS_PROXY_PORT);
	return 1;
}
