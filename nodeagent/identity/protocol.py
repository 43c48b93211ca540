"""Istio's certificate API, ``istio.v1.auth.IstioCertificateService/CreateCertificate``.

The protocol istio-agent and ztunnel speak to istiod (istio/api ``security/v1alpha1/ca.proto``):
a PEM CSR, an optional validity in seconds and a metadata Struct in; the certificate chain out,
leaf first, the CA's whole root bundle (``root-cert.pem``, possibly several roots) as the last
element. The caller authenticates with a bearer token in the ``authorization`` gRPC metadata; a
node proxy (ztunnel, here the node agent) asks for another workload's identity by naming it in
the Struct's ``ImpersonatedIdentity`` field.

No generated code: the two messages are described here field by field (numbers and types as in
ca.proto) and built with protobuf's message factory; the service is one unary method.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"
# istiod's port for the CA and xDS over TLS; the DaemonSet's --ca-address uses it too.
DEFAULT_PORT = 15012
# The audience of the token a client presents (Istio's default, the projected token's audience).
TOKEN_AUDIENCE = "istio-ca"
AUTHORIZATION = "authorization"  # gRPC metadata key: "Bearer <token>"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # metadata Struct key, a SPIFFE ID


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="nodeagent/istio/v1/auth/ca.proto",
        package="istio.v1.auth",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    field = descriptor_pb2.FieldDescriptorProto
    request = f.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    request.field.add(
        name="validity_duration", number=3, type=field.TYPE_INT64, label=field.LABEL_OPTIONAL
    )
    request.field.add(
        name="metadata",
        number=4,
        type=field.TYPE_MESSAGE,
        type_name=".google.protobuf.Struct",
        label=field.LABEL_OPTIONAL,
    )
    response = f.message_type.add(name="IstioCertificateResponse")
    response.field.add(
        name="cert_chain", number=1, type=field.TYPE_STRING, label=field.LABEL_REPEATED
    )
    return f


def _messages() -> tuple[Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(_file())
    request = pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest")
    response = pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse")
    return message_factory.GetMessageClass(request), message_factory.GetMessageClass(response)


# Message classes: IstioCertificateRequest(csr=..., validity_duration=..., metadata=Struct),
# IstioCertificateResponse(cert_chain=[...]).
IstioCertificateRequest, IstioCertificateResponse = _messages()
