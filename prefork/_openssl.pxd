# The OpenSSL calls the compiled loops make, declared nogil: the hot loop
# (prefork/_fastio.pyx) serves TLS on the socket itself, the load generator
# (prefork/_loadgen.pyx) is its client. The SSL_CTX is not made here: it is
# the one inside an ssl.SSLContext (the master's, prefork/tls.py; the
# client's, prefork/tools/bench.py), read with ``context_ctx`` below,
# so every setting (certificates, versions, ciphers, ALPN, client
# certificates, session-ticket keys) stays in one place. That only holds if
# Python's _ssl and this module use the same libssl: the loop checks
# OpenSSL_version_num() against ssl.OPENSSL_VERSION_NUMBER (context_ctx).
#
# Rule: cimport under a name, ``from prefork cimport _openssl as openssl``.

cdef extern from "<openssl/err.h>" nogil:
    void ERR_clear_error()
    unsigned long ERR_peek_error()
    int ERR_GET_REASON(unsigned long e)

# A peer gone without close_notify, as OpenSSL 3 reports it (1.1 says
# SSL_ERROR_SYSCALL instead, and never this reason).
cdef extern from *:
    """
    #ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING
    #define PREFORK_SSL_R_UNEXPECTED_EOF SSL_R_UNEXPECTED_EOF_WHILE_READING
    #else
    #define PREFORK_SSL_R_UNEXPECTED_EOF (-1)
    #endif
    """
    int PREFORK_SSL_R_UNEXPECTED_EOF

cdef extern from "<openssl/x509_vfy.h>" nogil:
    ctypedef struct X509_VERIFY_PARAM:
        pass
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc)

cdef extern from "<openssl/crypto.h>" nogil:
    unsigned long OpenSSL_version_num()

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    void SSL_set_accept_state(SSL *ssl)
    void SSL_set_connect_state(SSL *ssl)
    long SSL_set_tlsext_host_name(SSL *ssl, const char *name)  # a macro over SSL_ctrl
    int SSL_set1_host(SSL *ssl, const char *hostname)
    X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_pending(const SSL *ssl)
    int SSL_shutdown(SSL *ssl)
    long SSL_set_mode(SSL *ssl, long mode)  # a macro over SSL_ctrl
    long SSL_MODE_ENABLE_PARTIAL_WRITE
    long SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
    long SSL_MODE_RELEASE_BUFFERS
    int SSL_ERROR_NONE
    int SSL_ERROR_SSL
    int SSL_ERROR_WANT_READ
    int SSL_ERROR_WANT_WRITE
    int SSL_ERROR_SYSCALL
    int SSL_ERROR_ZERO_RETURN


# The head of CPython's PySSLContext (Modules/_ssl.c): the SSL_CTX it wraps
# comes right after the object header, in every CPython since 3.0.
cdef struct PySSLContextHead:
    Py_ssize_t ob_refcnt
    void *ob_type
    SSL_CTX *ctx


cdef inline SSL_CTX *context_ctx(object context) except NULL:
    """The SSL_CTX inside ``context`` (an ssl.SSLContext, kept alive by the
    caller), once this module is known to link the libssl Python's ssl does."""
    import ssl
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"not an ssl.SSLContext: {type(context).__name__}")
    if OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise RuntimeError(
            "this build of prefork links another OpenSSL than Python's ssl "
            f"({OpenSSL_version_num():#x} vs {ssl.OPENSSL_VERSION_NUMBER:#x})")
    return (<PySSLContextHead *><void *>context).ctx
