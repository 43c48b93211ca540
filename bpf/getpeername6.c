/* cgroup/getpeername6, attached to each captured pod's cgroup: getpeername4's twin for IPv6
 * sockets: a socket connected to [::1]:15053 or ::ffff:127.0.0.1:15053 by DNS capture reports the
 * resolver it dialled as its peer.
 */
#include "capture.h"

int getpeername6(struct bpf_sock_addr *ctx)
{
	show_resolver6(ctx);
	return 1;
}
