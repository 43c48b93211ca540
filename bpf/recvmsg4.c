/* cgroup/recvmsg4, attached to each captured pod's cgroup: a datagram from the DNS proxy
 * (127.0.0.1:15053) on a socket DNS capture redirected reads as coming from the resolver the app
 * dialled, as nftables' conntrack un-NATs the reply's source. Resolver libraries check it: glibc
 * drops a reply whose source is not the nameserver it asked, musl one from no listed nameserver,
 * dnspython raises. The resolver is the last one dialled on the socket (origin_by_cookie): glibc
 * uses one socket per nameserver, and musl, which asks every nameserver from one socket, accepts
 * the reply from any of them. Any other datagram is left as it came.
 */
#include "capture.h"

int recvmsg4(struct bpf_sock_addr *ctx)
{
	show_dialled4(ctx);
	return 1;
}
