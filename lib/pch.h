// Precompiled header shared by lib/, bindings/ and host/: the ATen surface, built once.
// Only headers every heavy TU needs anyway belong here.
#pragma once
#include <ATen/ATen.h>
#include <string>
#include <vector>
