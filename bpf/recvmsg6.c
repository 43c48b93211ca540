/* cgroup/recvmsg6, attached to each captured pod's cgroup: recvmsg4's twin for IPv6 sockets: a
 * datagram from [::1]:15053, or from ::ffff:127.0.0.1:15053 (IPv4 on a dual-stack socket), on a
 * socket DNS capture redirected reads as coming from the resolver dialled.
 */
#include "capture.h"

int recvmsg6(struct bpf_sock_addr *ctx)
{
	show_dialled6(ctx);
	return 1;
}
