# The OpenSSL calls the compiled hot loop makes (prefork/_fastio.pyx) to
# serve TLS on the socket itself, declared nogil. The SSL_CTX is not made
# here: it is the one inside the master's ssl.SSLContext (prefork/tls.py),
# so every setting (certificates, versions, ciphers, ALPN, client
# certificates, session-ticket keys) stays in one place. That only holds if
# Python's _ssl and this module use the same libssl: the loop checks
# OpenSSL_version_num() against ssl.OPENSSL_VERSION_NUMBER before it uses it.
#
# Rule: cimport under a name, ``from prefork cimport _openssl as openssl``.

cdef extern from "<openssl/err.h>" nogil:
    void ERR_clear_error()

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
