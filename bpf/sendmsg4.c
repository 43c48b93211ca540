/* cgroup/sendmsg4, attached to each captured pod's cgroup: DNS capture of unconnected UDP. A
 * datagram sent with an address (sendto/sendmsg: musl, dig, dnspython never connect) to port 53,
 * from a pod capturing DNS, goes to the DNS proxy at 127.0.0.1:15053, whatever the resolver, as
 * nftables' `udp dport 53 redirect to :15053` does; the mesh's own sockets (mark 0x539: the
 * proxy's upstream queries) are left alone. The resolver is remembered by socket cookie, so
 * recvmsg4 can give the proxy's reply the resolver's address. Connected UDP is connect4's.
 */
#include "capture.h"

int sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(DNS_PORT)) /* first: every datagram of the pod comes here */
		return 1;
	struct origin dialled;
	dialled4(ctx, &dialled);
	__u64 netns;
	struct pod_config *pod = pod_of(ctx, &dialled, &netns);
	if (pod && to_dns_proxy(ctx, pod, &dialled))
		to_loopback4(ctx, DNS_PROXY_PORT);
	return 1;
}
