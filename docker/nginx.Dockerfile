# Debian's nginx-light in the foreground, like the official nginx image: it reads
# /etc/nginx/conf.d/*.conf, where the compose files mount the key service's server block.
ARG BASE
FROM ${BASE}
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
