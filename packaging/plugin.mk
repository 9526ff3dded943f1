# Managed plugin targets (included by the top Makefile). Everything built goes under build/plugin/.
#
#   make plugin                     build, `docker plugin create` as PLUGIN_NAME, set PLUGIN_SETTINGS, enable
#   make plugin-create              build and create only (then `docker plugin set`, `docker plugin enable`)
#   make plugin-push                push PLUGIN_NAME (a registry/repo:tag name) to its registry
#   make plugin-base                a Python base image from Debian with debootstrap, for hosts without a registry:
#                                   make plugin-base && make plugin BASE_IMAGE=vault-secrets-base:bookworm
#
# The docker CLI honours DOCKER_HOST, so these targets work against any daemon.
DOCKER ?= docker
BASE_IMAGE ?= python:3.11-slim-bookworm
DEBIAN_BASE_IMAGE ?= vault-secrets-base:bookworm
PLUGIN_PYTHON ?= 3.11
PLUGIN_BUILD ?= build/plugin
PLUGIN_CACHE ?= /var/cache/vault-secrets
PLUGIN_ROOTFS_IMAGE ?= vault-secrets-plugin-rootfs:build
# e.g. PLUGIN_SETTINGS='VAULT_ADDR=https://vault:8200 VAULT_SECRETS_ROLE_ID=... bootstrap.source=/etc/vault-secrets'
PLUGIN_SETTINGS ?=
PLUGIN_ENABLE_TIMEOUT ?= 30

.PHONY: plugin plugin-create plugin-rootfs plugin-push plugin-base

plugin: plugin-create
	$(if $(strip $(PLUGIN_SETTINGS)),$(DOCKER) plugin set $(PLUGIN_NAME) $(PLUGIN_SETTINGS))
	$(DOCKER) plugin enable --timeout $(PLUGIN_ENABLE_TIMEOUT) $(PLUGIN_NAME)

plugin-create: plugin-rootfs
	$(DOCKER) plugin create $(PLUGIN_NAME) $(PLUGIN_BUILD)/bundle

plugin-rootfs: venv
	PY=$(PY) DOCKER=$(DOCKER) BASE_IMAGE=$(BASE_IMAGE) PLUGIN_PYTHON=$(PLUGIN_PYTHON) \
		ROOTFS_IMAGE=$(PLUGIN_ROOTFS_IMAGE) bash packaging/build-bundle.sh $(PLUGIN_BUILD)

plugin-push:
	$(DOCKER) plugin push $(PLUGIN_NAME)

plugin-base:
	DOCKER=$(DOCKER) CACHE_DIR=$(PLUGIN_CACHE) bash packaging/debian-base.sh $(DEBIAN_BASE_IMAGE)
